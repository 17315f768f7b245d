"""DICOM de-identification applied by the ingest service before anything is stored.

Profile
-------
PS3.15 Annex E *Basic Application Level Confidentiality Profile* (DCM 113100) with the
*Retain Longitudinal Temporal Information with Modified Dates Option* (DCM 113107).

Why the table comes from a library
----------------------------------
Table E.1-1 has ~650 rows and changes with every DICOM release. Typing it by hand is how
rows get lost, so the action lists are read at import time from ``dicom-anonymizer``
(KitwareMedical, pinned in ``requirements.txt``), edition :data:`PROFILE_TABLE_EDITION`.
Of the PyPI candidates it is the only one that encodes the table itself, per action code
and per DICOM edition (``deid`` ships recipes, ``dicognito`` hard-codes heuristics).
We use *only its data*: its actions (random UIDs kept in a module-global dict, dates
zeroed) conflict with our rules and are not thread-safe, so every action is applied here.

Deviations / choices where the profile leaves freedom
-----------------------------------------------------
* **U** (and any UI-valued attribute with a D-family action): keyed hash, see
  :meth:`Deidentifier.pseudonymise_uid`. Deterministic across processes, so instances
  ingested at different times still share Study/Series/FrameOfReference UIDs and
  references inside sequences stay consistent. SOP *Class* UIDs and the transfer syntax
  are not in the table and are never touched.
* **PatientID / PatientName**: keyed pseudonym (``VF-`` + base32 of an HMAC), stable per
  project, instead of Z/D and Z, so one patient stays one patient for training splits.
* **Dates (VR DA, DT)**, wherever they occur: shifted by a whole number of days that is
  derived from the key, project and original PatientID (the option's action C). This
  applies to dates the basic profile would remove (X) as well, because that is what the
  option is for; dates not listed in the table are shifted too so that no real date
  survives. Exception: PatientBirthDate/PatientBirthTime keep the basic-profile action
  (Z / X) because a shifted birth date plus a shifted study date still reveal the age.
* **Times (VR TM)** are retained: with a whole-day shift the time of day is unchanged.
* Combined codes, applied without knowledge of the IOD's attribute types:
  X/Z -> Z; Z/D, X/D, X/Z/D -> D for a non-empty value (an empty value stays empty);
  X/Z/U* -> keep the sequence and replace the instance UIDs inside it.
  These choices keep a Type 1/2 attribute conformant whatever the IOD.
* **D on a sequence**: items are kept and cleaned, and every free-text leaf inside them
  that the table does not cover is replaced by a dummy, so e.g. an Institution Code
  Sequence does not keep the institution's code.
* **Private attributes**: removed (the profile's default), except the few that rebuilding a
  volume needs and that hold only numbers and geometry (the Retain Safe Private Option, PS3.15
  E.3.10, with our own short list :data:`SAFE_PRIVATE`): the Siemens mosaic image count, b-value
  and gradient (SIEMENS MR HEADER 0019,xx0A/0C/0D/0E/27) and the CSA *image* header (0029,xx08/09/10:
  slice normal, images in the mosaic; the CSA *series* header with the protocol text is removed), and
  the UIH grid (0065,xx50/51: images in the grid and each slice's position, whose items are cleaned
  like any sequence, dates shifted), b-value and gradient (0065,xx09/37). They are matched by private
  creator, not by tag number alone; a kept sequence that arrived as UN (undecodable) is removed.
* **Overlays**: the table removes Overlay Data and Overlay Comments (60xx,3000/4000). The
  whole overlay group is removed, because an Overlay Plane module without its Type 1
  Overlay Data is not conformant. Curves (50xx,xxxx) are removed as the table says.
* Attributes not in the table (geometry, pixel module, SOPClassUID, Modality,
  Manufacturer, ...) are kept: the profile does not list them, and they are needed to
  rebuild volumes. Pixel data is never decoded.

Thread safety: :class:`Deidentifier` holds only its immutable key and project; every call
works on its own state, so one instance may be shared by threads.
"""

from __future__ import annotations

import copy
import datetime as _dt
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from pydicom.dataelem import DataElement, RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

from shared.pseudonyms import keyed_digest, pseudonymise_patient_id

__all__ = [
    "BASIC_PROFILE_ACTIONS",
    "BASIC_PROFILE_MASKED_ACTIONS",
    "DEIDENTIFICATION_METHOD",
    "PROFILE_TABLE_EDITION",
    "SAFE_PRIVATE",
    "DeidentificationResult",
    "Deidentifier",
    "MaskedRule",
    "ReidentificationEntries",
    "profile_action",
]

#: dicom-anonymizer database module holding PS3.15 Table E.1-1 (DICOM 2026c).
PROFILE_TABLE_EDITION: Final = "dicomfields_2026c"

_CATEGORY_TO_ACTION: Final[Mapping[str, str]] = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}


@dataclass(frozen=True)
class MaskedRule:
    """A table row for a repeating group such as Curve Data (50xx,xxxx)."""

    group: int
    element: int
    group_mask: int
    element_mask: int
    action: str

    def matches(self, tag: int) -> bool:
        """True when ``tag`` falls in this row's repeating group/element range."""
        return ((tag >> 16) & self.group_mask) == self.group and (tag & 0xFFFF & self.element_mask) == self.element


def _load_profile_table() -> tuple[dict[BaseTag, str], tuple[MaskedRule, ...]]:
    """Read Table E.1-1 from dicom-anonymizer; fail loudly if a row has two actions."""
    database = dicom_anonymization_database_selector(PROFILE_TABLE_EDITION)
    exact: dict[BaseTag, str] = {}
    masked: list[MaskedRule] = []
    for category, action in _CATEGORY_TO_ACTION.items():
        for row in database[category]:
            if len(row) == 4:
                masked.append(MaskedRule(row[0], row[1], row[2], row[3], action))
                continue
            tag = Tag(row[0], row[1])
            if tag in exact and exact[tag] != action:
                raise RuntimeError(f"profile table lists {tag} as both {exact[tag]} and {action}")
            exact[tag] = action
    return exact, tuple(masked)


_EXACT, _MASKED = _load_profile_table()
#: Table E.1-1 (basic profile column) by tag, as encoded by dicom-anonymizer.
BASIC_PROFILE_ACTIONS: Final[Mapping[BaseTag, str]] = MappingProxyType(_EXACT)
#: Table E.1-1 rows for repeating groups (curves, overlays).
BASIC_PROFILE_MASKED_ACTIONS: Final[tuple[MaskedRule, ...]] = _MASKED


def profile_action(tag: int) -> str | None:
    """The basic-profile action code for ``tag`` or None if the table does not list it."""
    action = BASIC_PROFILE_ACTIONS.get(BaseTag(tag))
    if action is not None:
        return action
    for rule in BASIC_PROFILE_MASKED_ACTIONS:
        if rule.matches(tag):
            return rule.action
    return None


#: Values written to DeidentificationMethod (LO, so each value is at most 64 characters).
DEIDENTIFICATION_METHOD: Final[tuple[str, ...]] = (
    f"PS3.15 E.1-1 Basic Profile ({PROFILE_TABLE_EDITION})",
    "Retain Longitudinal Temporal Info Modified Dates",
    "Retain Safe Private (volume geometry and diffusion only)",
    "voxelflow keyed-hash UIDs and patient pseudonyms",
)
_METHOD_CODES: Final = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    ("113111", "Retain Safe Private Option"),
)

#: Private attributes kept (Retain Safe Private Option): (group, private creator) -> element offsets
#: (the low byte of the element). Only what series -> volume reads (services/ingest/volume.py).
SAFE_PRIVATE: Final[Mapping[tuple[int, str], frozenset[int]]] = MappingProxyType(
    {
        (0x0019, "SIEMENS MR HEADER"): frozenset({0x0A, 0x0C, 0x0D, 0x0E, 0x27}),
        (0x0029, "SIEMENS CSA HEADER"): frozenset({0x08, 0x09, 0x10}),
        (0x0065, "Image Private Header"): frozenset({0x09, 0x37, 0x50, 0x51}),
    }
)

_PATIENT_ID: Final = Tag(0x0010, 0x0020)
_PATIENT_NAME: Final = Tag(0x0010, 0x0010)
_BIRTH_TAGS: Final = frozenset({Tag(0x0010, 0x0030), Tag(0x0010, 0x0032)})
_SOP_INSTANCE_UID: Final = Tag(0x0008, 0x0018)
_STRING_VRS: Final = frozenset({"AE", "AS", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "UR"})
_BYTES_VRS: Final = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_MAX_SHIFT_DAYS: Final = 3650
_DT_RE: Final = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(.*)$", re.DOTALL)


@dataclass(frozen=True)
class ReidentificationEntries:
    """What an admin needs to map de-identified data back to the source.

    Store it apart from the images, readable only by ``admin``: it is PHI.
    ``uid_map`` maps each original UID replaced in this dataset to its new UID.
    """

    original_patient_id: str
    pseudonymous_patient_id: str
    date_offset_days: int
    uid_map: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DeidentificationResult:
    """The de-identified dataset and the re-identification entries it produced."""

    dataset: Dataset
    reidentification: ReidentificationEntries


@dataclass
class _Call:
    """Per-call state: kept out of the Deidentifier so that it stays thread-safe."""

    offset_days: int
    uid_map: dict[str, str]


class Deidentifier:
    """Keyed, deterministic PS3.15 basic-profile de-identifier for one project.

    The same ``(key, project)`` always yields the same pseudonyms, UIDs and date offsets,
    in any process, which is what lets instances of one study arrive separately and
    still line up. A different key or project yields unrelated outputs, so two projects
    cannot link their patients.
    """

    def __init__(self, key: bytes, project: str) -> None:
        if not isinstance(key, bytes | bytearray) or len(key) < 16:
            raise ValueError("key must be at least 16 bytes (128 bits) of secret material")
        if not project:
            raise ValueError("project must be a non-empty string")
        self._key = bytes(key)
        self._project = project

    @property
    def project(self) -> str:
        """The project whose pseudonym space this instance produces."""
        return self._project

    def _mac(self, purpose: bytes, value: str) -> bytes:
        """The shared keyed digest (:func:`shared.pseudonyms.keyed_digest`) in this project's namespace."""
        return keyed_digest(self._key, purpose, self._project, value)

    def pseudonymise_uid(self, uid: str) -> str:
        """Keyed replacement for an instance UID: ``2.25.<UUIDv8 as integer>``, at most 44 chars.

        The HMAC is shaped into an RFC 9562 version-8 UUID so that the ``2.25`` root is
        used as PS3.5 B.2 intends. Surrounding whitespace/NUL padding is ignored.
        """
        raw = bytearray(self._mac(b"uid", uid.strip(" \x00"))[:16])
        raw[6] = (raw[6] & 0x0F) | 0x80
        raw[8] = (raw[8] & 0x3F) | 0x80
        return f"2.25.{uuid.UUID(bytes=bytes(raw)).int}"

    def pseudonymise_patient_id(self, pid: str) -> str:
        """Keyed pseudonym for a PatientID: ``VF-`` + 26 base32 characters (130 bits); the shared definition
        (:func:`shared.pseudonyms.pseudonymise_patient_id`), so inference's patient reference is the same."""
        return pseudonymise_patient_id(self._key, self._project, pid)

    def date_offset_days(self, pid: str) -> int:
        """Days (negative, 1..3650 into the past) added to every date of this patient.

        One offset per patient keeps intervals between that patient's studies exact and
        StudyDate range queries approximately meaningful; deriving it from the key means
        no state is needed to shift the next instance identically.
        """
        digest = self._mac(b"date-offset", pid.strip(" \x00"))
        return -(1 + int.from_bytes(digest[:8], "big") % _MAX_SHIFT_DAYS)

    def deidentify(self, ds: Dataset, *, in_place: bool = False) -> DeidentificationResult:
        """De-identify ``ds``; returns a new dataset (a deep copy) unless ``in_place``.

        The file meta (if any) is kept, with MediaStorageSOPInstanceUID set to the new
        SOPInstanceUID and the transfer syntax unchanged.
        """
        out = ds if in_place else copy.deepcopy(ds)
        original_pid = str(out.get("PatientID", "") or "")
        call = _Call(offset_days=self.date_offset_days(original_pid), uid_map={})
        pseudonym = self.pseudonymise_patient_id(original_pid)

        self._clean(out, call, dummy_leaves=False)

        out.PatientID = pseudonym
        out.PatientName = pseudonym
        out.PatientIdentityRemoved = "YES"
        out.LongitudinalTemporalInformationModified = "MODIFIED"
        self._record_method(out)

        meta = getattr(out, "file_meta", None)
        if meta is not None and "SOPInstanceUID" in out:
            meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
        elif meta is not None and "MediaStorageSOPInstanceUID" in meta:
            meta.MediaStorageSOPInstanceUID = self._map_uid(meta.MediaStorageSOPInstanceUID, call)

        return DeidentificationResult(
            dataset=out,
            reidentification=ReidentificationEntries(
                original_patient_id=original_pid,
                pseudonymous_patient_id=pseudonym,
                date_offset_days=call.offset_days,
                uid_map=MappingProxyType(dict(call.uid_map)),
            ),
        )

    # -- internals -------------------------------------------------------------------

    def _map_uid(self, uid: Any, call: _Call) -> str:
        original = str(uid).strip(" \x00")
        if not original:
            return ""
        new = call.uid_map.get(original)
        if new is None:
            new = self.pseudonymise_uid(original)
            call.uid_map[original] = new
        return new

    def _clean(self, ds: Dataset, call: _Call, *, dummy_leaves: bool) -> None:
        """Apply the profile to every element of ``ds`` and, recursively, its sequences."""
        for tag in list(ds.keys()):
            if tag.is_private:
                if not _is_safe_private(ds, tag):
                    del ds[tag]
                elif ds[tag].VR == "SQ":
                    self._clean_items(ds[tag], call, dummy_leaves=False)
                continue
            if _is_overlay_group(tag):
                del ds[tag]
                continue
            raw = ds.get_item(tag)
            if isinstance(raw, RawDataElement) and _left_as_is(tag, raw.VR, dummy_leaves=dummy_leaves):
                continue  # not decoded: written back byte for byte, which is most of the cost of a re-encode
            elem = ds[tag]  # converts a RawDataElement; pixel data stays encoded bytes
            if tag == _PATIENT_ID:
                elem.value = self.pseudonymise_patient_id(str(elem.value or ""))
                continue
            if tag == _PATIENT_NAME:
                sibling = ds.get(_PATIENT_ID)
                elem.value = self.pseudonymise_patient_id(str(sibling.value or "")) if sibling else ""
                continue
            action = profile_action(tag)
            if not self._apply(ds, elem, action, call, dummy_leaves=dummy_leaves):
                del ds[tag]

    def _apply(self, ds: Dataset, elem: DataElement, action: str | None, call: _Call, *, dummy_leaves: bool) -> bool:
        """Apply one action to ``elem``; returns False when the element must be removed."""
        vr = str(elem.VR)
        if vr in ("DA", "DT") and elem.tag not in _BIRTH_TAGS:
            _shift_element(elem, call.offset_days)  # option C, whatever the basic action
            return True
        if vr == "TM" and elem.tag not in _BIRTH_TAGS:
            return True  # whole-day shift: time of day unchanged
        if action is None:
            if vr == "SQ":
                self._clean_items(elem, call, dummy_leaves=dummy_leaves)
            elif dummy_leaves and vr in _STRING_VRS and not _is_empty(elem):
                elem.value = _dummy_for(vr)
            return True
        if action == "X":
            return False
        if action in ("Z", "X/Z"):
            _empty(elem)
            return True
        if vr == "UI":  # U, X/Z/U*, and the one UI attribute listed with D
            _map_multi(elem, lambda v: self._map_uid(v, call))
            return True
        if action == "X/Z/U*":
            if vr == "SQ":
                self._clean_items(elem, call, dummy_leaves=dummy_leaves)
            else:
                _empty(elem)
            return True
        if action == "U":  # a U row whose element is not UI-encoded (e.g. UN): remove
            return False
        # D, Z/D, X/D, X/Z/D: a dummy for non-empty values; an empty value stays empty.
        if vr == "SQ":
            self._clean_items(elem, call, dummy_leaves=True)
        elif not _is_empty(elem):
            elem.value = _dummy_for(vr)
        return True

    def _clean_items(self, elem: DataElement, call: _Call, *, dummy_leaves: bool) -> None:
        for item in elem.value or []:
            self._clean(item, call, dummy_leaves=dummy_leaves)

    @staticmethod
    def _record_method(ds: Dataset) -> None:
        """Append our method to any earlier de-identification record (PS3.3 C.7.1.1)."""
        previous = ds.get("DeidentificationMethod")
        values: list[str] = []
        if isinstance(previous, MultiValue | list):
            values = [str(v) for v in previous if v]
        elif previous:
            values = [str(previous)]
        values.extend(m for m in DEIDENTIFICATION_METHOD if m not in values)
        ds.DeidentificationMethod = values
        codes = ds.get("DeidentificationMethodCodeSequence")
        items: Sequence = codes if codes else Sequence()
        present = {(str(i.get("CodeValue", "")), str(i.get("CodingSchemeDesignator", ""))) for i in items}
        for value, meaning in _METHOD_CODES:
            if (value, "DCM") in present:
                continue
            item = Dataset()
            item.CodeValue = value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = items


def _is_safe_private(ds: Dataset, tag: BaseTag) -> bool:
    """True for a private creator listed in :data:`SAFE_PRIVATE` and the listed elements of its block.

    A listed sequence that arrived undecoded (VR UN, implicit VR without a dictionary entry) cannot be
    cleaned inside, so it is not kept.
    """
    if 0x0010 <= tag.element <= 0x00FF:  # a private creator element (gggg,00xx)
        return (tag.group, str(ds[tag].value).strip()) in SAFE_PRIVATE
    creator = ds.get(Tag(tag.group, tag.element >> 8))
    if creator is None:
        return False
    offsets = SAFE_PRIVATE.get((tag.group, str(creator.value).strip()))
    if offsets is None or (tag.element & 0xFF) not in offsets:
        return False
    return not (ds[tag].VR == "UN" and (tag.group, tag.element & 0xFF) == (0x0065, 0x51))


def _left_as_is(tag: BaseTag, vr: str | None, *, dummy_leaves: bool) -> bool:
    """True when :meth:`Deidentifier._apply` would keep this element unchanged, judged from its raw form.

    Only for a VR read from the file (explicit VR): an implicit-VR element (``vr`` None) or one read as UN
    gets its VR from the dictionary on decoding (a UN date becomes a DA to shift), so it is decoded and
    judged as usual; so are dates, sequences, the patient's name and ID, and any string a dummy replaces.
    Times are kept whatever the action (whole-day shift), as in ``_apply``."""
    if vr is None or vr in ("UN", "SQ", "DA", "DT") or tag in (_PATIENT_ID, _PATIENT_NAME) or tag in _BIRTH_TAGS:
        return False
    if vr == "TM":
        return True
    if dummy_leaves and vr in _STRING_VRS:
        return False
    return profile_action(tag) is None


def _is_overlay_group(tag: BaseTag) -> bool:
    return 0x6000 <= tag.group <= 0x601E and tag.group % 2 == 0


def _is_empty(elem: DataElement) -> bool:
    value = elem.value
    return (
        value is None or value == "" or value == b"" or (isinstance(value, Sequence | MultiValue | list) and not value)
    )


def _empty(elem: DataElement) -> None:
    elem.value = Sequence() if elem.VR == "SQ" else empty_value_for_VR(elem.VR)


def _dummy_for(vr: str) -> Any:
    """A VR-conformant dummy that carries no information (action D)."""
    if vr in ("AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"):
        return "ANONYMIZED"
    if vr == "AS":
        return "000Y"
    if vr == "UR":
        return "http://anonymized.invalid"
    if vr in ("DS", "IS"):
        return "0"
    if vr in _BYTES_VRS:
        return b"\x00\x00"
    return 0  # US, SS, UL, SL, FL, FD, SV, UV


def _map_multi(elem: DataElement, fn: Callable[[Any], str]) -> None:
    if isinstance(elem.value, MultiValue | list):
        elem.value = [fn(v) for v in elem.value]
    elif not _is_empty(elem):
        elem.value = fn(elem.value)


def _shift_element(elem: DataElement, offset_days: int) -> None:
    """Shift every value of a DA/DT element; an unparseable value is emptied (fail safe)."""
    shift = _shift_da if elem.VR == "DA" else _shift_dt
    values = list(elem.value) if isinstance(elem.value, MultiValue | list) else [elem.value]
    shifted = [shift(str(v), offset_days) if v not in (None, "") else "" for v in values]
    if any(s is None for s in shifted):
        _empty(elem)
    elif isinstance(elem.value, MultiValue | list):
        elem.value = shifted
    elif values[0] not in (None, ""):
        elem.value = shifted[0]


def _shift_da(value: str, offset_days: int) -> str | None:
    text = value.strip().replace(".", "")  # ACR-NEMA YYYY.MM.DD
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        day = _dt.date(int(text[:4]), int(text[4:6]), int(text[6:])) + _dt.timedelta(days=offset_days)
    except (ValueError, OverflowError):
        return None
    return f"{day.year:04d}{day.month:02d}{day.day:02d}"  # strftime does not zero-pad years < 1000


def _shift_dt(value: str, offset_days: int) -> str | None:
    """Shift the date part of a DT, keeping its precision, time of day and UTC offset."""
    match = _DT_RE.match(value.strip())
    if match is None:
        return None
    year, month, day, rest = match.groups()
    if rest and not day and rest[0] not in "+-":
        return None  # a time without a full date: cannot be shifted safely
    try:
        shifted = _dt.date(int(year), int(month or 1), int(day or 1)) + _dt.timedelta(days=offset_days)
    except (ValueError, OverflowError):
        return None
    out = f"{shifted.year:04d}"
    if month:
        out += f"{shifted.month:02d}"
    if day:
        out += f"{shifted.day:02d}"
    return out + rest
