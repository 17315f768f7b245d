"""QIDO-RS searches over the catalogue (PS3.18 10.6), answered from the database alone.

UIDs and PatientID may be given either as stored (pseudonymised) or as the caller knows them
(original): an original value is translated with the same keyed hash ingest used, so a PACS can find
what it sent without voxelflow ever storing or returning the original. Original PatientIDs are translated
only for the roles in :data:`shared.auth.ORIGINAL_IDENTIFIER_ROLES` (PACS, admin): for a researcher a
PatientID matches stored pseudonyms only, so querying cannot map an MRN to its pseudonym.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import keyword_for_tag, tag_for_keyword
from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.orm import Session

from services.ingest.dicomweb import element
from services.ingest.models import Instance, Patient, Series, Study
from shared.validation import INT32_MAX

LEVELS = ("study", "series", "instance")
MAX_LIMIT = 1000


class QueryError(ValueError):
    """A QIDO parameter voxelflow cannot honour (400)."""


@dataclass(frozen=True)
class QidoQuery:
    level: str
    filters: dict[str, list[str]]
    includefields: set[str]  # keywords; "all" for every attribute
    limit: int
    offset: int
    #: PS3.18 8.3.4.1: fuzzy matching of person names (here: PatientName, the one PN matching key)
    fuzzymatching: bool = False


def _keyword(key: str) -> str:
    if re.fullmatch(r"[0-9A-Fa-f]{8}", key):
        keyword = keyword_for_tag(int(key, 16))
        if not keyword:
            raise QueryError(f"unknown attribute tag {key}")
        return keyword
    if tag_for_keyword(key) is None:
        raise QueryError(f"unknown attribute {key!r}")
    return key


MATCHING_KEYS = {
    "study": {
        "StudyInstanceUID",
        "PatientID",
        "PatientName",
        "StudyDate",
        "AccessionNumber",
        "ModalitiesInStudy",
        "StudyDescription",
    },
}
MATCHING_KEYS["series"] = MATCHING_KEYS["study"] | {
    "Modality",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
}
MATCHING_KEYS["instance"] = MATCHING_KEYS["series"] | {"SOPInstanceUID", "SOPClassUID", "InstanceNumber"}


# The database sees every matching value: no NUL or other control characters, no unbounded text.
_UNSAFE_TEXT = re.compile(r"[\x00-\x1f\x7f]")
MAX_VALUE_LENGTH = 1024


def _non_negative(key: str, value: str) -> int:
    """ASCII digits within PostgreSQL's INTEGER (``str.isdigit`` also admits '²', which ``int`` refuses)."""
    if not re.fullmatch(r"[0-9]{1,10}", value) or int(value) > INT32_MAX:
        raise QueryError(f"{key} must be an integer from 0 to {INT32_MAX}")
    return int(value)


def parse_query(level: str, params: list[tuple[str, str]]) -> QidoQuery:
    filters: dict[str, list[str]] = {}
    includefields: set[str] = set()
    limit, offset = 100, 0
    fuzzy = False
    for key, value in params:
        if _UNSAFE_TEXT.search(key) or _UNSAFE_TEXT.search(value) or len(value) > MAX_VALUE_LENGTH:
            raise QueryError(
                f"query parameter {key[:64]!r}: values must be at most {MAX_VALUE_LENGTH} characters "
                "without control characters"
            )
        if key == "limit":
            limit = min(_non_negative(key, value), MAX_LIMIT)
        elif key == "offset":
            offset = _non_negative(key, value)
        elif key == "includefield":
            for item in value.split(","):
                includefields.add("all" if item.strip() == "all" else _keyword(item.strip()))
        elif key == "fuzzymatching":
            if value.lower() not in ("true", "false"):
                raise QueryError("fuzzymatching must be true or false")
            fuzzy = value.lower() == "true"
        else:
            keyword = _keyword(key)
            if keyword not in MATCHING_KEYS[level]:
                raise QueryError(
                    f"{keyword} is not a supported matching key at {level} level; supported: "
                    + ", ".join(sorted(MATCHING_KEYS[level]))
                )
            filters.setdefault(keyword, []).extend(v for v in value.split(",") if v != "")
    return QidoQuery(level, filters, includefields, limit, offset, fuzzy)


def _wildcard(column: Any, pattern: str) -> Any:
    if "*" in pattern or "?" in pattern:
        like = pattern.replace("%", r"\%").replace("_", r"\_").replace("*", "%").replace("?", "_")
        return column.like(like, escape="\\")
    return column == pattern


NAME_SEPARATORS = re.compile(r"[\^ ]+")


def _fuzzy_name(column: Any, pattern: str) -> Any:
    """Fuzzy person-name matching (PS3.4 C.2.2.2.1, implementation-defined): case-insensitive, each
    component of the query (split at ``^`` and spaces) the start of some component of the name, in any
    order; ``*`` and ``?`` keep their meaning. "smith^j" finds "SMITH^JOHN" and "John Smith"."""
    name = func.lower(column)
    conditions = []
    for part in NAME_SEPARATORS.split(pattern.lower()):
        if not part:
            continue
        like = part.replace("\\", "\\\\").replace("%", r"\%").replace("_", r"\_").replace("*", "%").replace("?", "_")
        starts = [name.like(f"{like}%", escape="\\")]
        starts += [name.like(f"%{sep}{like}%", escape="\\") for sep in ("^", " ", "-")]
        conditions.append(or_(*starts))
    return and_(*conditions) if conditions else column.is_not(None)


def _date_range(column: Any, value: str) -> Any:
    if "-" not in value:
        return column == value
    start, end = value.split("-", 1)
    if not all(re.fullmatch(r"\d{8}", d) for d in (start, end) if d):
        raise QueryError(f"date range {value!r} must be YYYYMMDD-YYYYMMDD, -YYYYMMDD or YYYYMMDD-")
    conditions = []
    if start:
        conditions.append(column >= start)
    if end:
        conditions.append(column <= end)
    return conditions[0] if len(conditions) == 1 else (conditions[0] & conditions[1])


def build_select(query: QidoQuery, translate: Callable[[str, str], str | None]) -> Select[Any]:
    """``translate(kind, original)`` gives the pseudonym of an original UID/PatientID, or None when the caller
    may not search by original values of that kind (then only stored pseudonyms match)."""
    entity = {"study": Study, "series": Series, "instance": Instance}[query.level]
    statement = select(entity)
    if query.level in ("series", "instance"):
        statement = statement.join(Study, Series.study_id == Study.id) if query.level == "series" else statement
    if query.level == "instance":
        statement = statement.join(Series, Instance.series_id == Series.id).join(Study, Series.study_id == Study.id)
    statement = statement.join(Patient, Study.patient_id == Patient.id)
    uid_columns = {
        "StudyInstanceUID": Study.study_instance_uid,
        "SeriesInstanceUID": Series.series_instance_uid,
        "SOPInstanceUID": Instance.sop_instance_uid,
    }
    for keyword, values in query.filters.items():
        if keyword in uid_columns:
            column = uid_columns[keyword]
            translated = [t for t in (translate("uid", v) for v in values) if t]
            statement = statement.where(or_(column.in_(values), column.in_(translated)))
        elif keyword == "PatientName" and query.fuzzymatching:
            statement = statement.where(or_(*(_fuzzy_name(Patient.pseudonym, v) for v in values)))
        elif keyword in ("PatientID", "PatientName"):
            literal = [v for v in values if "*" not in v and "?" not in v]
            translated = [t for t in (translate("patient", v) for v in literal) if t]
            statement = statement.where(
                or_(
                    *(_wildcard(Patient.pseudonym, v) for v in values),
                    Patient.pseudonym.in_(translated),
                )
            )
        elif keyword == "StudyDate":
            statement = statement.where(or_(*(_date_range(Study.study_date, v) for v in values)))
        elif keyword == "AccessionNumber":
            statement = statement.where(or_(*(_wildcard(Study.accession_number, v) for v in values)))
        elif keyword == "StudyDescription":
            statement = statement.where(or_(*(_wildcard(Study.study_description, v) for v in values)))
        elif keyword == "ModalitiesInStudy":
            in_study = select(Series.study_id).where(Series.modality.in_(values))
            statement = statement.where(Study.id.in_(in_study))
        elif keyword == "Modality":
            statement = statement.where(Series.modality.in_(values))
        elif keyword == "SeriesNumber":
            statement = statement.where(Series.series_number.in_([int(v) for v in values if v.isdigit()]))
        elif keyword == "SeriesDescription":
            statement = statement.where(or_(*(_wildcard(Series.series_description, v) for v in values)))
        elif keyword == "SOPClassUID":
            statement = statement.where(Instance.sop_class_uid.in_(values))
        elif keyword == "InstanceNumber":
            statement = statement.where(Instance.instance_number.in_([int(v) for v in values if v.isdigit()]))
    order = {"study": Study.id, "series": Series.id, "instance": Instance.id}[query.level]
    return statement.order_by(order).limit(query.limit).offset(query.offset)


def _from_header(header: Mapping[str, Any], includefields: set[str], out: dict[str, Any]) -> None:
    if not includefields:
        return
    for tag, value in header.items():
        keyword = keyword_for_tag(int(tag, 16))
        if "all" in includefields or keyword in includefields:
            out.setdefault(tag, value)


def study_json(session: Session, study: Study, base_url: str, includefields: set[str]) -> dict[str, Any]:
    series_count, instance_count = session.execute(
        select(func.count(func.distinct(Series.id)), func.count(Instance.id))
        .select_from(Series)
        .join(Instance, Instance.series_id == Series.id, isouter=True)
        .where(Series.study_id == study.id)
    ).one()
    modalities = sorted({m for m in session.scalars(select(Series.modality).where(Series.study_id == study.id)) if m})
    out = {
        "00080020": element("DA", study.study_date),
        "00080030": element("TM", study.study_time),
        "00080050": element("SH", study.accession_number),
        "00080061": element("CS", *modalities),
        "00081030": element("LO", study.study_description),
        "00081190": element("UR", f"{base_url}/dicomweb/studies/{study.study_instance_uid}"),
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": study.patient.pseudonym}]},
        "00100020": element("LO", study.patient.pseudonym),
        "0020000D": element("UI", study.study_instance_uid),
        "00201206": element("IS", series_count),
        "00201208": element("IS", instance_count),
    }
    if includefields:
        first = session.scalar(select(Instance.dicom_json).join(Series).where(Series.study_id == study.id).limit(1))
        _from_header(first or {}, includefields, out)
    return dict(sorted(out.items()))


def series_json(session: Session, series: Series, base_url: str, includefields: set[str]) -> dict[str, Any]:
    count = session.scalar(select(func.count(Instance.id)).where(Instance.series_id == series.id))
    study = series.study
    out = {
        "00080060": element("CS", series.modality),
        "00080070": element("LO", series.manufacturer),
        "0008103E": element("LO", series.series_description),
        "00081190": element(
            "UR",
            f"{base_url}/dicomweb/studies/{study.study_instance_uid}/series/{series.series_instance_uid}",
        ),
        "0020000D": element("UI", study.study_instance_uid),
        "0020000E": element("UI", series.series_instance_uid),
        "00200011": element("IS", series.series_number),
        "00201209": element("IS", count),
    }
    if includefields:
        first = session.scalar(select(Instance.dicom_json).where(Instance.series_id == series.id).limit(1))
        _from_header(first or {}, includefields, out)
    return dict(sorted(out.items()))


def instance_json(instance: Instance, base_url: str, includefields: set[str]) -> dict[str, Any]:
    series = instance.series
    study = series.study
    out = {
        "00080016": element("UI", instance.sop_class_uid),
        "00080018": element("UI", instance.sop_instance_uid),
        "00081190": element(
            "UR",
            f"{base_url}/dicomweb/studies/{study.study_instance_uid}/series/{series.series_instance_uid}"
            f"/instances/{instance.sop_instance_uid}",
        ),
        "0020000D": element("UI", study.study_instance_uid),
        "0020000E": element("UI", series.series_instance_uid),
        "00200013": element("IS", instance.instance_number),
        "00280008": element("IS", instance.number_of_frames),
        "00280010": element("US", instance.rows),
        "00280011": element("US", instance.columns),
    }
    _from_header(instance.dicom_json, includefields, out)
    return dict(sorted(out.items()))


__all__ = ["LEVELS", "QidoQuery", "QueryError", "build_select", "parse_query"]
