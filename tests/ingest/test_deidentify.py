"""Tests for services.ingest.deidentify: tag by tag against PS3.15 Table E.1-1, then
consistency of the keyed pseudonyms, then real files from shared/data."""

from __future__ import annotations

import datetime as dt
import io
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, MRImageStorage

from services.ingest.deidentify import (
    BASIC_PROFILE_ACTIONS,
    BASIC_PROFILE_MASKED_ACTIONS,
    SAFE_PRIVATE,
    Deidentifier,
    profile_action,
)

KEY = b"0123456789abcdef0123456789abcdef"
PROJECT = "glioma-2026"
PID = "PAT-0001"
BIRTH_TAGS = {Tag(0x0010, 0x0030), Tag(0x0010, 0x0032)}
SECRET_CODE = "SECRET1"
REF_CLASS = MRImageStorage
REF_INSTANCE = "1.2.826.0.1.3680043.2.1125.9.9.9.1"


@pytest.fixture(scope="module")
def deid() -> Deidentifier:
    return Deidentifier(KEY, PROJECT)


# -- tag by tag against the profile ------------------------------------------------------


def _vr(tag: int) -> str:
    """Dictionary VR (first choice of 'US or SS' style entries); LO for tags newer than pydicom."""
    try:
        return dictionary_VR(tag).split(" or ")[0]
    except KeyError:
        return "LO"


def _plausible(vr: str) -> Any:
    values: dict[str, Any] = {
        "AE": "STATION1",
        "AS": "045Y",
        "CS": "SECRETCODE",
        "DA": "20200315",
        "DT": "20200315123000.000000+0100",
        "TM": "123000",
        "DS": "1.5",
        "IS": "7",
        "PN": "Doe^John",
        "UI": "1.2.826.0.1.3680043.2.1125.1.2.3",
        "UR": "http://example.org/secret",
        "FL": 1.5,
        "FD": 1.5,
        "AT": 0x00100010,
    }
    if vr in values:
        return values[vr]
    if vr in ("US", "SS", "UL", "SL", "SV", "UV"):
        return 7
    if vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN"):
        return b"\x01\x02\x03\x04"
    return "Secret Value"  # LO, SH, LT, ST, UC, UT


def _sequence_value() -> Sequence:
    item = Dataset()
    item.CodeValue = SECRET_CODE
    item.CodingSchemeDesignator = "99LOCAL"
    item.CodeMeaning = "Secret meaning"
    item.ReferencedSOPClassUID = REF_CLASS
    item.ReferencedSOPInstanceUID = REF_INSTANCE
    return Sequence([item])


def _profile_cases() -> Iterator[Any]:
    for tag, action in sorted(BASIC_PROFILE_ACTIONS.items()):
        yield pytest.param(tag, action, id=f"{tag.group:04X},{tag.element:04X}-{action}")
    for rule in BASIC_PROFILE_MASKED_ACTIONS:  # two concrete groups per repeating-group row
        for group_offset in (0x00, 0x1E):
            element = rule.element if rule.element_mask else 0x3000
            tag = Tag(rule.group + group_offset, element)
            yield pytest.param(tag, rule.action, id=f"{tag.group:04X},{tag.element:04X}-{rule.action}")


def _shift_date(value: str, days: int) -> str:
    return (dt.datetime.strptime(value, "%Y%m%d").date() + dt.timedelta(days=days)).strftime("%Y%m%d")


def _is_empty(value: Any) -> bool:
    return value is None or value in ("", b"") or (isinstance(value, Sequence | list) and len(value) == 0)


def test_profile_table_is_complete_enough() -> None:
    """Guards against an upstream table that silently lost rows (2026c has 652 + 3 masked)."""
    assert len(BASIC_PROFILE_ACTIONS) > 600
    assert profile_action(0x00100010) == "Z"  # PatientName
    assert profile_action(0x0020000D) == "U"  # StudyInstanceUID
    assert profile_action(0x50020010) == "X"  # curve group
    assert profile_action(0x00080016) is None  # SOPClassUID is not touched
    assert profile_action(0x00080070) is None  # Manufacturer: not listed, kept


@pytest.mark.parametrize(("tag", "action"), list(_profile_cases()))
def test_profile_action(deid: Deidentifier, tag: BaseTag, action: str) -> None:
    vr = _vr(tag)
    original: Any = _sequence_value() if vr == "SQ" else _plausible(vr)
    ds = Dataset()
    ds.PatientID = PID
    if tag != Tag(0x0010, 0x0020):
        ds.add_new(tag, vr, original)
    result = deid.deidentify(ds)
    out = result.dataset
    offset = deid.date_offset_days(PID)
    assert result.reidentification.date_offset_days == offset

    if tag == Tag(0x0010, 0x0020):
        assert out.PatientID == deid.pseudonymise_patient_id(PID)
        return
    if tag == Tag(0x0010, 0x0010):
        assert str(out.PatientName) == deid.pseudonymise_patient_id(PID)
        return
    if vr in ("DA", "DT") and tag not in BIRTH_TAGS:  # longitudinal option: shifted, kept
        expected = _shift_date(original[:8], offset) + original[8:]
        assert out[tag].value == expected
        return
    if vr == "TM" and tag not in BIRTH_TAGS:  # whole-day shift leaves the time of day
        assert out[tag].value == original
        return

    if action == "X":
        assert tag not in out
    elif action in ("Z", "X/Z"):
        assert tag in out and _is_empty(out[tag].value)
    elif vr == "UI":  # U, and the UI attributes listed with D or X/Z/U*
        assert out[tag].value == deid.pseudonymise_uid(original)
        assert result.reidentification.uid_map[original] == out[tag].value
    elif action == "X/Z/U*":
        item = out[tag].value[0]
        assert item.ReferencedSOPInstanceUID == deid.pseudonymise_uid(REF_INSTANCE)
        assert item.ReferencedSOPClassUID == REF_CLASS
    elif action in ("D", "Z/D", "X/D", "X/Z/D"):
        assert tag in out
        value = out[tag].value
        assert not _is_empty(value)
        if vr == "SQ":
            item = value[0]
            assert item.CodeValue != SECRET_CODE
            assert item.ReferencedSOPInstanceUID == deid.pseudonymise_uid(REF_INSTANCE)
            assert item.ReferencedSOPClassUID == REF_CLASS
        else:
            assert value != original
    else:  # pragma: no cover - a new action code upstream must be handled deliberately
        pytest.fail(f"unhandled action {action}")


# -- synthetic instances: consistency ------------------------------------------------------


def _instance(sop: str, *, pid: str = PID, study_date: str = "20200101", refs: tuple[str, ...] = ()) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = "1.2.3.100"
    ds.SeriesInstanceUID = "1.2.3.100.1"
    ds.FrameOfReferenceUID = "1.2.3.100.9"
    ds.PatientID = pid
    ds.PatientName = "Doe^Jane"
    ds.PatientBirthDate = "19600102"
    ds.StudyDate = study_date
    ds.StudyTime = "101500"
    ds.Modality = "MR"
    ds.Manufacturer = "ACME"
    ds.InstitutionName = "General Hospital"
    ds.ImagePositionPatient = [-10.5, 20.25, 30.0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = "1.25"
    ds.Rows, ds.Columns = 2, 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
    ds.PixelData = np.arange(4, dtype=np.uint16).tobytes()
    if refs:
        ds.ReferencedImageSequence = Sequence(
            [Dataset() for _ in refs],
        )
        for item, ref in zip(ds.ReferencedImageSequence, refs, strict=True):
            item.ReferencedSOPClassUID = MRImageStorage
            item.ReferencedSOPInstanceUID = ref
    block = ds.private_block(0x0013, "CTP", create=True)
    block.add_new(0x10, "LO", "Secret-Collection")
    return ds


def test_same_series_gets_same_pseudonyms_and_references_resolve(deid: Deidentifier) -> None:
    first = deid.deidentify(_instance("1.2.3.100.1.1")).dataset
    second = deid.deidentify(_instance("1.2.3.100.1.2", refs=("1.2.3.100.1.1",))).dataset
    assert first.StudyInstanceUID == second.StudyInstanceUID != "1.2.3.100"
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    assert first.FrameOfReferenceUID == second.FrameOfReferenceUID
    assert first.PatientID == second.PatientID == str(first.PatientName)
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert second.ReferencedImageSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert second.ReferencedImageSequence[0].ReferencedSOPClassUID == MRImageStorage
    assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID
    assert first.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_image_attributes_are_preserved(deid: Deidentifier) -> None:
    original = _instance("1.2.3.100.1.1")
    out = deid.deidentify(original).dataset
    for keyword in (
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "SliceThickness",
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "RescaleSlope",
        "RescaleIntercept",
        "SOPClassUID",
        "Modality",
        "Manufacturer",
        "PixelData",
        "StudyTime",
    ):
        assert out[keyword].value == original[keyword].value, keyword
    assert out.InstitutionName == "ANONYMIZED"  # X/Z/D with a value: dummy
    assert out.PatientBirthDate == ""
    assert Tag(0x0013, 0x1010) not in out and Tag(0x0013, 0x0010) not in out
    assert out.PatientIdentityRemoved == "YES"
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    codes = {(i.CodeValue, i.CodingSchemeDesignator) for i in out.DeidentificationMethodCodeSequence}
    assert {("113100", "DCM"), ("113107", "DCM")} <= codes
    assert all(len(v) <= 64 for v in out.DeidentificationMethod)


def test_copy_by_default_in_place_on_request(deid: Deidentifier) -> None:
    original = _instance("1.2.3.100.1.1")
    deid.deidentify(original)
    assert original.PatientID == PID and original.SOPInstanceUID == "1.2.3.100.1.1"
    result = deid.deidentify(original, in_place=True)
    assert result.dataset is original and original.PatientID != PID


def test_reidentification_entries(deid: Deidentifier) -> None:
    result = deid.deidentify(_instance("1.2.3.100.1.2", refs=("1.2.3.100.1.1",)))
    entries = result.reidentification
    assert entries.original_patient_id == PID
    assert entries.pseudonymous_patient_id == result.dataset.PatientID
    assert entries.date_offset_days == deid.date_offset_days(PID) < 0
    assert entries.uid_map == {
        uid: deid.pseudonymise_uid(uid)
        for uid in ("1.2.3.100.1.2", "1.2.3.100", "1.2.3.100.1", "1.2.3.100.9", "1.2.3.100.1.1")
    }


def test_keys_and_projects_separate_pseudonym_spaces() -> None:
    a = Deidentifier(KEY, PROJECT)
    b = Deidentifier(b"another key, 32 bytes long......", PROJECT)
    c = Deidentifier(KEY, "other-project")
    for other in (b, c):
        assert a.pseudonymise_uid("1.2.3") != other.pseudonymise_uid("1.2.3")
        assert a.pseudonymise_patient_id(PID) != other.pseudonymise_patient_id(PID)
        out_a = a.deidentify(_instance("1.2.3.100.1.1")).dataset
        out_o = other.deidentify(_instance("1.2.3.100.1.1")).dataset
        assert out_a.StudyInstanceUID != out_o.StudyInstanceUID
    assert Deidentifier(KEY, PROJECT).pseudonymise_uid("1.2.3") == a.pseudonymise_uid("1.2.3")


def test_pseudonym_formats(deid: Deidentifier) -> None:
    uid = deid.pseudonymise_uid("1.2.840.10008.9999." + "1" * 40)
    assert uid.startswith("2.25.") and len(uid) <= 64
    assert all(part.isdigit() and (part == "0" or part[0] != "0") for part in uid.split("."))
    pid = deid.pseudonymise_patient_id(PID)
    assert pid.startswith("VF-") and len(pid) <= 64 and pid.isascii()
    assert deid.pseudonymise_uid("1.2.3 ") == deid.pseudonymise_uid("1.2.3\x00") == deid.pseudonymise_uid("1.2.3")


def test_same_output_in_another_process(deid: Deidentifier) -> None:
    code = (
        "from services.ingest.deidentify import Deidentifier as D;"
        f"d=D({KEY!r},{PROJECT!r});print(d.pseudonymise_uid('1.2.3'),d.pseudonymise_patient_id({PID!r}),"
        f"d.date_offset_days({PID!r}))"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [
        deid.pseudonymise_uid("1.2.3"),
        deid.pseudonymise_patient_id(PID),
        str(deid.date_offset_days(PID)),
    ]


def test_date_intervals_within_a_patient_are_preserved(deid: Deidentifier) -> None:
    baseline = deid.deidentify(_instance("1.2.3.1", study_date="20191231")).dataset
    follow_up = deid.deidentify(_instance("1.2.3.2", study_date="20200315")).dataset
    parse = dt.datetime.strptime
    interval = parse(follow_up.StudyDate, "%Y%m%d") - parse(baseline.StudyDate, "%Y%m%d")
    assert interval.days == (dt.date(2020, 3, 15) - dt.date(2019, 12, 31)).days
    assert baseline.StudyDate != "20191231"
    offsets = {deid.date_offset_days(f"PAT-{i}") for i in range(20)}
    assert len(offsets) > 1, "offsets must differ between patients"


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
@pytest.mark.parametrize(
    ("vr", "value", "expected"),
    [
        ("DT", "2020", "2019"),  # year precision shifts the 1st of January
        ("DT", "202003", "201912"),
        ("DT", "20200315", "20191216"),
        ("DT", "20200315083000-0500", "20191216083000-0500"),
        ("DA", "2020.03.15", "20191216"),  # ACR-NEMA form is normalised
        ("DA", "not-a-date", ""),  # unparseable: emptied rather than leaked
    ],
)
def test_partial_and_odd_dates(vr: str, value: str, expected: str) -> None:
    deid = Deidentifier(KEY, PROJECT)
    pid = next(p for p in (f"P{i}" for i in range(10_000)) if deid.date_offset_days(p) == -90)
    ds = Dataset()
    ds.PatientID = pid
    ds.add_new(0x00080020 if vr == "DA" else 0x0008002A, vr, value)
    out = deid.deidentify(ds).dataset
    assert (out.StudyDate if vr == "DA" else out.AcquisitionDateTime) == expected


def test_private_tags_removed_inside_sequences(deid: Deidentifier) -> None:
    ds = _instance("1.2.3.1", refs=("1.2.3.0",))
    ds.ReferencedImageSequence[0].add_new(0x00111010, "LO", "nested private")
    out = deid.deidentify(ds).dataset
    assert all(not elem.tag.is_private for elem in out.iterall())


def test_thread_safe(deid: Deidentifier) -> None:
    instances = [_instance(f"1.2.3.100.1.{i}", pid=f"PAT-{i % 3}") for i in range(30)]
    expected = [deid.deidentify(ds).dataset.SOPInstanceUID for ds in instances]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda ds: deid.deidentify(ds).dataset.SOPInstanceUID, instances))
    assert got == expected


def test_rejects_weak_keys() -> None:
    with pytest.raises(ValueError):
        Deidentifier(b"short", PROJECT)
    with pytest.raises(ValueError):
        Deidentifier(KEY, "")


# -- real files ----------------------------------------------------------------------------


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "SHA256SUMS")


def _strings(ds: Dataset) -> Iterator[str]:
    for elem in ds.iterall():
        values = elem.value if isinstance(elem.value, list | pydicom.multival.MultiValue) else [elem.value]
        for value in values:
            if isinstance(value, str | pydicom.valuerep.PersonName):
                yield str(value)


def test_real_mr_studies(deid: Deidentifier, shared_data: Path) -> None:
    folder = shared_data / "tcia_brain_tumor_progression_mr"
    files = _dicom_files(folder)
    if not files:
        pytest.skip(f"no files under {folder}")
    study_uids: dict[str, set[str]] = {}
    for path in files:
        original = pydicom.dcmread(path)
        secrets = {str(original.PatientID), str(original.PatientName), str(original.SOPInstanceUID)}
        out = deid.deidentify(original).dataset
        leaked = secrets.intersection(_strings(out)) | {s for s in _strings(out) for secret in secrets if secret in s}
        assert not leaked, f"{path}: {leaked}"
        assert _only_safe_private(out), path
        assert Tag(0x0013, 0x1010) not in out
        buffer = io.BytesIO()
        out.save_as(buffer)
        reread = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
        assert reread.file_meta.MediaStorageSOPInstanceUID == reread.SOPInstanceUID
        assert reread.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        np.testing.assert_array_equal(reread.pixel_array, original.pixel_array, err_msg=str(path))
        assert reread.ImagePositionPatient == original.ImagePositionPatient
        study_uids.setdefault(str(original.StudyInstanceUID), set()).add(str(reread.StudyInstanceUID))
    # every original study maps to exactly one pseudonymous study, whichever series it came from
    assert all(len(new) == 1 for new in study_uids.values())


def test_real_jpeg2000_ct_keeps_compressed_pixels(deid: Deidentifier, shared_data: Path) -> None:
    folder = shared_data / "totalsegmentator_ct_example" / "dicom"
    files = _dicom_files(folder)
    if not files:
        pytest.skip(f"no files under {folder}")
    for index, path in enumerate(files):
        original = pydicom.dcmread(path)
        syntax = original.file_meta.TransferSyntaxUID
        assert syntax.is_compressed
        out = deid.deidentify(original).dataset
        assert out.file_meta.TransferSyntaxUID == syntax
        assert out.PixelData == original.PixelData  # encapsulated bytes untouched
        buffer = io.BytesIO()
        out.save_as(buffer)
        reread = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
        assert reread.file_meta.TransferSyntaxUID == syntax
        assert reread.PixelData == original.PixelData
        assert reread.PatientID == deid.pseudonymise_patient_id(str(original.PatientID))
        if index == 0:  # decoding J2K is slow-ish: one file proves the stream still decodes
            np.testing.assert_array_equal(reread.pixel_array, original.pixel_array)


def _only_safe_private(ds: pydicom.Dataset) -> bool:
    """Every private element left is a listed creator or a listed element of its block (SAFE_PRIVATE)."""
    for dataset in [ds, *(item for elem in ds.iterall() if elem.VR == "SQ" for item in elem.value)]:
        for elem in dataset:
            if not elem.tag.is_private:
                continue
            if 0x10 <= elem.tag.element <= 0xFF:
                if (elem.tag.group, str(elem.value)) not in SAFE_PRIVATE:
                    return False
                continue
            creator = str(dataset[Tag(elem.tag.group, elem.tag.element >> 8)].value)
            if (elem.tag.element & 0xFF) not in SAFE_PRIVATE.get((elem.tag.group, creator), ()):
                return False
    return True


def test_siemens_mosaic_keeps_what_its_volume_needs(deid: Deidentifier, tmp_path: Path) -> None:
    """Retain Safe Private: a real Siemens mosaic keeps its CSA image header and mosaic/diffusion numbers,
    loses the CSA series header (protocol text) and every other private element, and still reconstructs."""
    from services.ingest.volume import reconstruct_series
    from tests.ingest.dicom_cases import siemens_mosaic_dwi

    files, _ = siemens_mosaic_dwi(tmp_path / "original")
    before = reconstruct_series(files)[0]
    cleaned = []
    for path in files:
        original = pydicom.dcmread(path)
        assert (0x0029, 0x1020) in original and (0x0051, 0x1008) in original  # CSA series header, other private
        out = deid.deidentify(original).dataset
        assert (0x0029, 0x1010) in out and (0x0019, 0x100A) in out and (0x0019, 0x100C) in out
        assert (0x0029, 0x1020) not in out and not any(elem.tag.group == 0x0051 for elem in out)
        assert _only_safe_private(out)
        assert "113111" in {str(item.CodeValue) for item in out.DeidentificationMethodCodeSequence}
        cleaned.append(tmp_path / path.name)
        out.save_as(cleaned[-1])
    after = reconstruct_series(cleaned)[0]
    np.testing.assert_array_equal(after.array, before.array)
    np.testing.assert_allclose(after.affine, before.affine)
    assert after.b_values == before.b_values and after.b_vectors == before.b_vectors


def test_uih_grid_keeps_its_slice_positions_with_dates_shifted(deid: Deidentifier, tmp_path: Path) -> None:
    from services.ingest.volume import reconstruct_series
    from tests.ingest.dicom_cases import pattern_volume, uih_grid_series

    (path,) = uih_grid_series(tmp_path / "original", [pattern_volume((8, 6, 5))])
    original = pydicom.dcmread(path)
    block = original.private_block(0x0065, "Image Private Header")
    for item in block[0x51].value:
        item.AcquisitionDate = "20240102"
        item.add_new(0x00651015, "DS", [1.0, 2.0, 3.0])  # a private element inside an item
    block.add_new(0x07, "OB", b"private blob")  # not listed: removed
    out = deid.deidentify(original).dataset
    # by tag: out.private_block() would answer from the original (pydicom's block cache survives the deep copy)
    assert Tag(0x0065, 0x1007) not in out and Tag(0x0065, 0x1050) in out
    items = out[Tag(0x0065, 0x1051)].value
    assert [list(i.ImagePositionPatient) for i in items] == [
        list(i.ImagePositionPatient) for i in original[Tag(0x0065, 0x1051)].value
    ]
    assert all(str(i.AcquisitionDate) != "20240102" for i in items)  # shifted like every date
    assert all(not elem.tag.is_private for i in items for elem in i)
    out.save_as(tmp_path / "clean.dcm")
    (volume,) = reconstruct_series([tmp_path / "clean.dcm"])
    assert volume.array.shape == (8, 6, 5) and volume.metadata["mosaic"] == "uih"


# -- elements left undecoded ---------------------------------------------------------------


def _encoded(ds: Dataset, *, implicit_vr: bool) -> bytes:
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _deidentified_bytes(deid: Deidentifier, data: bytes, *, decode_first: bool) -> bytes:
    from services.ingest.validation import read_instance

    ds = read_instance(io.BytesIO(data))  # as the receiver reads it
    if decode_first:  # every element decoded before de-identification: nothing can be left raw
        for element in ds.iterall():
            _ = element.value
    out = deid.deidentify(ds, in_place=True).dataset
    buffer = io.BytesIO()
    out.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("implicit_vr", [False, True], ids=["explicit-vr", "implicit-vr"])
def test_elements_left_undecoded_give_the_same_file_as_decoded_ones(deid: Deidentifier, implicit_vr: bool) -> None:
    """De-identification leaves the elements it does not change undecoded (copied byte for byte on
    writing). That must not change what it does: a date read as UN (explicit VR) or without a VR (implicit
    VR) is still shifted, names and IDs still replaced, and the file is the one a fully decoded copy gives."""
    ds = _instance("1.2.3.100.1.7", refs=("1.2.3.100.1.8",))
    ds.add_new(0x00080021, "UN", b"20200101")  # SeriesDate as UN: its VR comes from the dictionary on decoding
    # a date the profile table does not list (shifted all the same), as UN
    ds.add_new(0x00143076, "UN", b"20200101")  # DateOfGainCalibration
    ds.OperatorsName = "Smith^Op"
    ds.ScanningSequence = "SE"
    data = _encoded(ds, implicit_vr=implicit_vr)
    fast = _deidentified_bytes(deid, data, decode_first=False)
    assert fast == _deidentified_bytes(deid, data, decode_first=True)
    out = pydicom.dcmread(io.BytesIO(fast), force=True)
    shifted = _shift_date("20200101", deid.date_offset_days(PID))
    assert out.StudyDate == shifted and out.SeriesDate == shifted and out.DateOfGainCalibration == shifted
    assert out.PatientID == deid.pseudonymise_patient_id(PID) and "Doe" not in str(out.PatientName)
    assert "OperatorsName" not in out or str(out.OperatorsName) != "Smith^Op"
    assert out.ScanningSequence == "SE" and out.Manufacturer == "ACME"
    assert out.ReferencedImageSequence[0].ReferencedSOPInstanceUID == deid.pseudonymise_uid("1.2.3.100.1.8")


def test_real_files_left_undecoded_give_the_same_file_as_decoded_ones(deid: Deidentifier, shared_data: Path) -> None:
    files = _dicom_files(shared_data / "tcia_brain_tumor_progression_mr")[:20]
    for folder in ("lidc_idri_ct_slabs", "enhanced_multiframe_mr", "dicom_seg"):
        files += [p for p in _dicom_files(shared_data / folder) if p.suffix == ".dcm"][:3]
    if not files:
        pytest.skip("no shared DICOM files")
    for path in files:
        data = path.read_bytes()
        fast = _deidentified_bytes(deid, data, decode_first=False)
        assert fast == _deidentified_bytes(deid, data, decode_first=True), path
