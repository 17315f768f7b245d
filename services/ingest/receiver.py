"""Receiving one DICOM instance, whichever door it came through (STOW-RS, C-STORE, pull).

validate → de-identify → claim the catalogue row → write the blob → mark it stored. The row is
claimed before the blob is written so that two concurrent deliveries of the same SOP instance can
never overwrite each other's content; a crash between the two steps leaves a *pending* row that the
next delivery of the same content completes. Same UID with the same content is a success stored
once; same UID with different content is a conflict, and the stored copy is never touched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from pydicom.dataset import Dataset
from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from services.ingest import metrics
from services.ingest.deidentify import DeidentificationResult, Deidentifier
from services.ingest.models import Instance, Patient, ReidentificationEntry, Series, Study
from services.ingest.validation import (
    PIXEL_DATA_KEYWORDS,
    InstanceRejectedError,
    RejectReason,
    read_instance,
    validate_instance,
)
from shared.db.base import session_scope, utcnow
from shared.storage import ObjectStore

log = logging.getLogger("voxelflow.ingest.receiver")

BULK_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
BULK_INLINE_LIMIT = 1024


@dataclass(frozen=True)
class ReceivedInstance:
    duplicate: bool  # True when this exact content was already stored
    sop_class_uid: str
    original_sop_instance_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str


def header_json(dataset: Dataset) -> dict[str, Any]:
    """DICOM JSON (PS3.18 F.2) of the header, without pixel data or other large binary values."""
    out: dict[str, Any] = {}
    for element in dataset:
        if element.keyword in PIXEL_DATA_KEYWORDS:
            continue
        if element.VR in BULK_VRS and element.value is not None and len(element.value) > BULK_INLINE_LIMIT:
            continue
        out[f"{element.tag:08X}"] = element.to_json_dict(None, BULK_INLINE_LIMIT)
    return out


def content_hash(header: dict[str, Any], dataset: Dataset) -> str:
    """Identity of an instance's content independent of how it was encoded on the wire (implicit vs
    explicit VR, with or without preamble), so a C-STORE and a STOW of the same object are duplicates."""
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for keyword in PIXEL_DATA_KEYWORDS:
        if keyword in dataset:
            digest.update(dataset[keyword].value)
    return digest.hexdigest()


def _insert_ignoring_conflicts(session: Session, table: Any, values: dict[str, Any]) -> None:
    dialect = session.get_bind().dialect.name
    insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[dialect]
    session.execute(insert(table).values(**values).on_conflict_do_nothing())  # type: ignore[attr-defined]


def _text(dataset: Dataset, keyword: str, limit: int) -> str | None:
    value = dataset.get(keyword)
    return str(value)[:limit] if value not in (None, "") else None


def _int(dataset: Dataset, keyword: str) -> int | None:
    try:
        value = dataset.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


class InstanceReceiver:
    def __init__(
        self,
        session_factory: sessionmaker[Session],
        store: ObjectStore,
        deidentifier: Deidentifier,
        site: str,
        max_instance_bytes: int,
        on_series_receiving: Callable[[str], None],
    ):
        self.session_factory = session_factory
        self.store = store
        self.deidentifier = deidentifier
        self.site = site
        self.max_instance_bytes = max_instance_bytes
        self.on_series_receiving = on_series_receiving

    def receive_stream(
        self, stream: IO[bytes], size: int, source: str, expected_study_uid: str | None = None
    ) -> ReceivedInstance:
        """Receive a Part-10 file. Raises :class:`InstanceRejectedError`; counts metrics either way."""
        try:
            if size > self.max_instance_bytes:
                raise InstanceRejectedError(
                    RejectReason.TOO_LARGE,
                    f"instance of {size} bytes exceeds the {self.max_instance_bytes}-byte limit",
                )
            dataset = read_instance(stream)
            return self._receive(dataset, size, source, expected_study_uid)
        except InstanceRejectedError as exc:
            metrics.instances_rejected_total.labels(source, exc.reason.value).inc()
            raise

    def receive_dataset(
        self, dataset: Dataset, size: int, source: str, calling_ae_title: str | None = None
    ) -> ReceivedInstance:
        """Receive an already-parsed dataset (C-STORE, WADO-RS pull); ``calling_ae_title``: the C-STORE's sender."""
        try:
            if size > self.max_instance_bytes:
                raise InstanceRejectedError(RejectReason.TOO_LARGE, f"instance of {size} bytes exceeds the limit")
            return self._receive(dataset, size, source, None, calling_ae_title)
        except InstanceRejectedError as exc:
            metrics.instances_rejected_total.labels(source, exc.reason.value).inc()
            raise

    def _receive(
        self,
        dataset: Dataset,
        size: int,
        source: str,
        expected_study_uid: str | None,
        calling_ae_title: str | None = None,
    ) -> ReceivedInstance:
        validate_instance(dataset)
        original_sop_uid = str(dataset.SOPInstanceUID)
        sop_class_uid = str(dataset.SOPClassUID)
        if expected_study_uid and expected_study_uid not in (
            str(dataset.StudyInstanceUID),
            self.deidentifier.pseudonymise_uid(str(dataset.StudyInstanceUID)),
        ):
            raise InstanceRejectedError(
                RejectReason.STUDY_MISMATCH,
                f"instance belongs to study {dataset.StudyInstanceUID}, not {expected_study_uid}",
                sop_class_uid,
                original_sop_uid,
            )
        # what the sender called the series, before the profile removes it: only routing rules read it
        routing_description = _text(dataset, "SeriesDescription", 256)
        try:  # malformed values that validation let through surface here: the sender's fault, not a 500
            result = self.deidentifier.deidentify(dataset)
            clean = result.dataset
            header = header_json(clean)
            digest = content_hash(header, clean)
        except InstanceRejectedError:
            raise
        except Exception as exc:
            raise InstanceRejectedError(
                RejectReason.UNPARSEABLE,
                f"unreadable content: {type(exc).__name__}: {str(exc)[:300]}",
                sop_class_uid,
                original_sop_uid,
            ) from exc
        study_uid, series_uid, sop_uid = (
            str(clean.StudyInstanceUID),
            str(clean.SeriesInstanceUID),
            str(clean.SOPInstanceUID),
        )
        key = f"dicom/{study_uid}/{series_uid}/{sop_uid}.dcm"
        outcome = ReceivedInstance(False, sop_class_uid, original_sop_uid, sop_uid, study_uid, series_uid)

        with tempfile.SpooledTemporaryFile(max_size=16 * 1024**2) as encoded:
            try:
                clean.save_as(encoded, enforce_file_format=True)
            except Exception as exc:
                raise InstanceRejectedError(
                    RejectReason.UNPARSEABLE,
                    f"cannot be written as a DICOM file: {type(exc).__name__}: {str(exc)[:300]}",
                    sop_class_uid,
                    original_sop_uid,
                ) from exc
            encoded_size = encoded.tell()
            encoded.seek(0)
            with session_scope(self.session_factory) as session:
                state, series_started = self._claim_row(
                    session, clean, result, header, digest, key, encoded_size, source, original_sop_uid
                )
                if routing_description:
                    session.execute(
                        update(Series)
                        .where(
                            Series.series_instance_uid == series_uid,
                            Series.routing_description.is_(None),
                        )
                        .values(routing_description=routing_description)
                    )
                if calling_ae_title and state == "pending":
                    session.execute(
                        update(Instance)
                        .where(Instance.sop_instance_uid == str(clean.SOPInstanceUID))
                        .values(calling_ae_title=calling_ae_title.strip()[:16])
                    )
            if state == "stored":
                metrics.instances_received_total.labels(source).inc()
                return dataclasses.replace(outcome, duplicate=True)
            try:
                self.store.put_stream(key, encoded, encoded_size, "application/dicom", {"sha256": digest})
            except Exception as exc:
                log.exception("object storage write failed for %s", key)
                raise InstanceRejectedError(
                    RejectReason.STORAGE_ERROR, f"storage unavailable: {exc}", sop_class_uid, original_sop_uid
                ) from exc
        with session_scope(self.session_factory) as session:
            session.execute(update(Instance).where(Instance.sop_instance_uid == sop_uid).values(state="stored"))
        if series_started:
            self.on_series_receiving(series_uid)
        metrics.instances_received_total.labels(source).inc()
        metrics.bytes_received_total.labels(source).inc(size)
        metrics.last_received_timestamp_seconds.labels(source).set(time.time())
        return outcome

    def _claim_row(
        self,
        session: Session,
        clean: Dataset,
        result: DeidentificationResult,
        header: dict[str, Any],
        digest: str,
        key: str,
        encoded_size: int,
        source: str,
        original_sop_uid: str,
    ) -> tuple[str, bool]:
        """Create patient/study/series/instance rows as needed; return (instance state, series restarted)."""
        reid = result.reidentification
        pseudonym = str(clean.PatientID)
        _insert_ignoring_conflicts(session, Patient, {"pseudonym": pseudonym, "created_at": utcnow()})
        entries: list[tuple[str, str, str, int | None]] = [
            ("patient", pseudonym, reid.original_patient_id, reid.date_offset_days)
        ]
        entries += [("uid", new, old, None) for old, new in reid.uid_map.items()]
        for kind, new, old, offset in entries:
            _insert_ignoring_conflicts(
                session,
                ReidentificationEntry,
                {
                    "kind": kind,
                    "pseudonym": new,
                    "original": old,
                    "date_offset_days": offset,
                    "created_at": utcnow(),
                },
            )
        patient_id = session.scalar(select(Patient.id).where(Patient.pseudonym == pseudonym))
        _insert_ignoring_conflicts(
            session,
            Study,
            {
                "study_instance_uid": str(clean.StudyInstanceUID),
                "patient_id": patient_id,
                "study_date": _text(clean, "StudyDate", 8),
                "study_time": _text(clean, "StudyTime", 16),
                "accession_number": _text(clean, "AccessionNumber", 64),
                "study_description": _text(clean, "StudyDescription", 256),
                "created_at": utcnow(),
            },
        )
        study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == str(clean.StudyInstanceUID)))
        _insert_ignoring_conflicts(
            session,
            Series,
            {
                "series_instance_uid": str(clean.SeriesInstanceUID),
                "study_id": study_id,
                "modality": _text(clean, "Modality", 16),
                "series_number": _int(clean, "SeriesNumber"),
                "series_description": _text(clean, "SeriesDescription", 256),
                "manufacturer": _text(clean, "Manufacturer", 128),
                "site": self.site,
                "status": "new",
                "generation": 0,
                "last_received_at": utcnow(),
                "volumes": [],
            },
        )
        series_id = session.scalar(select(Series.id).where(Series.series_instance_uid == str(clean.SeriesInstanceUID)))
        sop_uid = str(clean.SOPInstanceUID)
        _insert_ignoring_conflicts(
            session,
            Instance,
            {
                "sop_instance_uid": sop_uid,
                "series_id": series_id,
                "sop_class_uid": str(clean.SOPClassUID),
                "instance_number": _int(clean, "InstanceNumber"),
                "transfer_syntax_uid": str(clean.file_meta.TransferSyntaxUID),
                "rows": _int(clean, "Rows"),
                "columns": _int(clean, "Columns"),
                "number_of_frames": _int(clean, "NumberOfFrames"),
                "object_key": key,
                "size_bytes": encoded_size,
                "content_hash": digest,
                "source": source,
                "state": "pending",
                "received_at": utcnow(),
                "dicom_json": header,
            },
        )
        existing = session.execute(
            select(Instance.content_hash, Instance.state, Instance.series_id).where(
                Instance.sop_instance_uid == sop_uid
            )
        ).one()
        if existing.content_hash != digest:
            raise InstanceRejectedError(
                RejectReason.CONFLICT,
                "an instance with this SOP Instance UID but different content is already stored",
                str(clean.SOPClassUID),
                original_sop_uid,
            )
        if existing.state == "stored":
            return "stored", False
        # A new instance (re)opens its series: the stability timer restarts and a new generation begins.
        session.execute(update(Series).where(Series.id == series_id).values(last_received_at=utcnow()))
        restarted = session.execute(
            update(Series)
            .where(Series.id == series_id, Series.status != "receiving")
            .values(status="receiving", generation=Series.generation + 1)
        ).rowcount  # type: ignore[attr-defined]
        return "pending", bool(restarted)
