"""Receiving DICOM instances, whichever door they came through (STOW-RS, C-STORE, pull).

validate → de-identify → claim the catalogue rows → write the blobs → mark them stored. Rows are
claimed before the blobs are written so that two concurrent deliveries of the same SOP instance can
never overwrite each other's content; a crash between the two steps leaves *pending* rows that the
next delivery of the same content completes. Same UID with the same content is a success stored
once; same UID with different content is a conflict, and the stored copy is never touched.

The instances of one delivery (the parts of a STOW-RS request) are received as one batch: each is
parsed and de-identified once, then the rows of all of them are claimed in one transaction of a few
set-based statements (one multi-row ``INSERT ... ON CONFLICT DO NOTHING`` per table, one update per
batch of the series rows), the blobs are written in parallel, and one statement marks them stored. Per
instance that is a fraction of a round trip and of a commit instead of ~10 round trips and two commits,
and the hot Series row is updated once per request instead of once per instance. An instance that
fails (unparseable, conflict, storage error) fails alone, with its reason; the others are stored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any

from pydicom.dataset import Dataset
from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from services.ingest import metrics
from services.ingest.deidentify import Deidentifier
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
# An encoded copy stays in memory up to this size, then spills to a temporary file: a batch holds at
# most BATCH_MAX_INSTANCES of them (the STOW route cuts a request into batches), so memory stays bounded.
ENCODED_SPOOL_BYTES = 4 * 1024**2
BATCH_MAX_INSTANCES = 32
# Object-storage writes of one batch run in parallel: each is mostly a wait on the S3 server.
PARALLEL_PUTS = 8
# PostgreSQL SQLSTATEs of a transaction that lost a race (deadlock, serialization failure): retried.
_RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})
CLAIM_ATTEMPTS = 3


@dataclass(frozen=True)
class ReceivedInstance:
    duplicate: bool  # True when this exact content was already stored
    sop_class_uid: str
    original_sop_instance_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str


#: What the receiver says about each instance of a batch: received, or why not. An exception that is
#: not an :class:`InstanceRejectedError` is an unforeseen failure (the caller reports it as a processing
#: failure of that instance, never as a failure of the whole request).
Outcome = ReceivedInstance | Exception


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


def _insert_ignoring_conflicts(session: Session, table: Any, rows: list[dict[str, Any]]) -> Any:
    """One multi-row ``INSERT ... ON CONFLICT DO NOTHING`` (the statement, for ``.returning``)."""
    dialect = session.get_bind().dialect.name
    insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[dialect]
    return insert(table).values(rows).on_conflict_do_nothing()  # type: ignore[attr-defined]


def _text(dataset: Dataset, keyword: str, limit: int) -> str | None:
    value = dataset.get(keyword)
    return str(value)[:limit] if value not in (None, "") else None


def _int(dataset: Dataset, keyword: str) -> int | None:
    try:
        value = dataset.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


@dataclass
class _Prepared:
    """One validated, de-identified, encoded instance and the catalogue rows it needs. The parsed dataset
    is not kept: only the encoded copy (spooled) and the few values the rows hold."""

    index: int
    outcome: ReceivedInstance
    size: int  # bytes as received (metrics)
    key: str
    digest: str
    encoded: IO[bytes]
    encoded_size: int
    pseudonym: str
    reidentification: list[tuple[str, str, str, int | None]]  # (kind, pseudonym, original, date offset)
    study: dict[str, Any]
    series: dict[str, Any]
    instance: dict[str, Any]  # without series_id (known after the series rows are claimed)
    state: str = ""  # after the claim: "pending" (to be written) or "stored" (already there)


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
        self._puts: ThreadPoolExecutor | None = None
        self._puts_lock = threading.Lock()

    # -- doors --------------------------------------------------------------------------------------

    def receive_stream(
        self, stream: IO[bytes], size: int, source: str, expected_study_uid: str | None = None
    ) -> ReceivedInstance:
        """Receive a Part-10 file. Raises :class:`InstanceRejectedError`; counts metrics either way."""
        return _one(self.receive_streams([(stream, size)], source, expected_study_uid))

    def receive_dataset(
        self, dataset: Dataset, size: int, source: str, calling_ae_title: str | None = None
    ) -> ReceivedInstance:
        """Receive an already-parsed dataset (C-STORE, WADO-RS pull); the caller's dataset is not changed.
        ``calling_ae_title``: the C-STORE's sender (routing rules match on it)."""
        return _one(
            self._receive_batch(
                [(None, dataset, size)], source, None, copy_dataset=True, calling_ae_title=calling_ae_title
            )
        )

    def receive_streams(
        self, items: Sequence[tuple[IO[bytes], int]], source: str, expected_study_uid: str | None = None
    ) -> list[Outcome]:
        """Receive several Part-10 files ``(stream, size)`` as one batch (the parts of a STOW request), at most
        :data:`BATCH_MAX_INSTANCES`: one outcome per item, in order, each the received instance or the
        exception that refused it. Nothing raises for an instance: when the catalogue or object storage
        cannot be reached, the instances it concerns carry that exception and none of them is acknowledged."""
        return self._receive_batch([(stream, None, size) for stream, size in items], source, expected_study_uid)

    # -- the batch ----------------------------------------------------------------------------------

    def _receive_batch(
        self,
        items: Sequence[tuple[IO[bytes] | None, Dataset | None, int]],
        source: str,
        expected_study_uid: str | None,
        copy_dataset: bool = False,
        calling_ae_title: str | None = None,
    ) -> list[Outcome]:
        if len(items) > BATCH_MAX_INSTANCES:
            raise ValueError(f"a batch holds at most {BATCH_MAX_INSTANCES} instances, not {len(items)}")
        outcomes: list[Outcome | None] = [None] * len(items)
        prepared: list[_Prepared] = []
        try:
            for index, (stream, dataset, size) in enumerate(items):
                try:
                    prepared.append(
                        self._prepare(index, stream, dataset, size, expected_study_uid, copy_dataset, calling_ae_title)
                    )
                except Exception as exc:
                    outcomes[index] = exc
            # The same SOP instance twice in one batch: the first copy is received, a later identical copy
            # shares its outcome, a later different one is a conflict (as two requests in a row would be).
            first: dict[str, _Prepared] = {}
            followers: list[tuple[_Prepared, _Prepared]] = []
            unique: list[_Prepared] = []
            for item in prepared:
                earlier = first.get(item.outcome.sop_instance_uid)
                if earlier is None:
                    first[item.outcome.sop_instance_uid] = item
                    unique.append(item)
                elif earlier.digest == item.digest:
                    followers.append((item, earlier))
                else:
                    outcomes[item.index] = _conflict(item)
            if unique:
                try:
                    self._store_unique(unique, outcomes, source)
                except Exception as exc:  # the catalogue (or broker) is unreachable: nothing new is acknowledged
                    log.exception("receiving a batch of %d instances failed", len(unique))
                    for item in unique:
                        known = outcomes[item.index]  # a conflict or an already stored duplicate stays what it is
                        if known is None or (isinstance(known, ReceivedInstance) and not known.duplicate):
                            outcomes[item.index] = exc
            for item, earlier in followers:
                outcomes[item.index] = outcomes[earlier.index]
        finally:
            for item in prepared:
                item.encoded.close()
        done: list[Outcome] = []
        for outcome in outcomes:
            assert outcome is not None
            if isinstance(outcome, InstanceRejectedError):
                metrics.instances_rejected_total.labels(source, outcome.reason.value).inc()
            elif isinstance(outcome, ReceivedInstance):
                metrics.instances_received_total.labels(source).inc()
            done.append(outcome)
        return done

    def _store_unique(self, unique: list[_Prepared], outcomes: list[Outcome | None], source: str) -> None:
        """Claim, write and mark the distinct instances of a batch; fill in their outcomes."""
        conflicts, restarted = self._claim(unique, source)
        for item in unique:
            if item.index in conflicts:
                outcomes[item.index] = _conflict(item)
            elif item.state == "stored":
                outcomes[item.index] = dataclasses.replace(item.outcome, duplicate=True)
        to_write = [item for item in unique if item.state == "pending" and item.index not in conflicts]
        for item, error in zip(to_write, self._write(to_write), strict=True):
            outcomes[item.index] = error if error is not None else item.outcome
        stored = [item for item in to_write if not isinstance(outcomes[item.index], Exception)]
        if stored:
            self._mark_stored([item.outcome.sop_instance_uid for item in stored])
        for series_uid in restarted:
            self.on_series_receiving(series_uid)
        now = time.time()
        for item in stored:
            metrics.bytes_received_total.labels(source).inc(item.size)
            metrics.last_received_timestamp_seconds.labels(source).set(now)

    def _prepare(
        self,
        index: int,
        stream: IO[bytes] | None,
        dataset: Dataset | None,
        size: int,
        expected_study_uid: str | None,
        copy_dataset: bool,
        calling_ae_title: str | None = None,
    ) -> _Prepared:
        """Parse (once), validate, de-identify and encode one instance; raises InstanceRejectedError."""
        if size > self.max_instance_bytes:
            raise InstanceRejectedError(
                RejectReason.TOO_LARGE,
                f"instance of {size} bytes exceeds the {self.max_instance_bytes}-byte limit",
            )
        if dataset is None:
            assert stream is not None
            dataset = read_instance(stream)
            copy_dataset = False  # parsed here for this purpose only: de-identified in place, no deep copy
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
            result = self.deidentifier.deidentify(dataset, in_place=not copy_dataset)
            clean = result.dataset
        except InstanceRejectedError:
            raise
        except Exception as exc:
            raise _unreadable(exc, sop_class_uid, original_sop_uid) from exc
        study_uid, series_uid, sop_uid = (
            str(clean.StudyInstanceUID),
            str(clean.SeriesInstanceUID),
            str(clean.SOPInstanceUID),
        )
        key = f"dicom/{study_uid}/{series_uid}/{sop_uid}.dcm"
        # Encoded before the header is turned into JSON: the elements de-identification left as they were
        # are still undecoded then and are copied byte for byte instead of being re-encoded.
        encoded = tempfile.SpooledTemporaryFile(max_size=ENCODED_SPOOL_BYTES)  # noqa: SIM115 (closed by the batch)
        try:
            try:
                clean.save_as(encoded, enforce_file_format=True)
            except Exception as exc:
                raise InstanceRejectedError(
                    RejectReason.UNPARSEABLE,
                    f"cannot be written as a DICOM file: {type(exc).__name__}: {str(exc)[:300]}",
                    sop_class_uid,
                    original_sop_uid,
                ) from exc
            try:
                header = header_json(clean)
                digest = content_hash(header, clean)
            except Exception as exc:
                raise _unreadable(exc, sop_class_uid, original_sop_uid) from exc
        except BaseException:
            encoded.close()
            raise
        encoded_size = encoded.tell()
        encoded.seek(0)
        reid = result.reidentification
        pseudonym = str(clean.PatientID)
        now = utcnow()
        return _Prepared(
            index=index,
            outcome=ReceivedInstance(False, sop_class_uid, original_sop_uid, sop_uid, study_uid, series_uid),
            size=size,
            key=key,
            digest=digest,
            encoded=encoded,
            encoded_size=encoded_size,
            pseudonym=pseudonym,
            reidentification=[
                ("patient", pseudonym, reid.original_patient_id, reid.date_offset_days),
                *(("uid", new, old, None) for old, new in reid.uid_map.items()),
            ],
            study={
                "study_instance_uid": study_uid,
                "study_date": _text(clean, "StudyDate", 8),
                "study_time": _text(clean, "StudyTime", 16),
                "accession_number": _text(clean, "AccessionNumber", 64),
                "study_description": _text(clean, "StudyDescription", 256),
                "created_at": now,
            },
            series={
                "series_instance_uid": series_uid,
                "modality": _text(clean, "Modality", 16),
                "series_number": _int(clean, "SeriesNumber"),
                "series_description": _text(clean, "SeriesDescription", 256),
                "routing_description": routing_description,
                "manufacturer": _text(clean, "Manufacturer", 128),
                "site": self.site,
                "status": "new",
                "generation": 0,
                "last_received_at": now,
                "volumes": [],
            },
            instance={
                "sop_instance_uid": sop_uid,
                "sop_class_uid": sop_class_uid,
                "instance_number": _int(clean, "InstanceNumber"),
                "transfer_syntax_uid": str(clean.file_meta.TransferSyntaxUID),
                "rows": _int(clean, "Rows"),
                "columns": _int(clean, "Columns"),
                "number_of_frames": _int(clean, "NumberOfFrames"),
                "object_key": key,
                "size_bytes": encoded_size,
                "content_hash": digest,
                "state": "pending",
                "received_at": now,
                "calling_ae_title": calling_ae_title.strip()[:16] if calling_ae_title else None,
                "dicom_json": header,
            },
        )

    # -- catalogue ----------------------------------------------------------------------------------

    def _claim(self, items: list[_Prepared], source: str) -> tuple[set[int], list[str]]:
        """Claim the rows of a batch in one transaction; set each item's ``state``. Returns the indices of
        the items in conflict (same UID, other content) and the series (UIDs) this batch (re)opened.

        A transaction that loses a race to a concurrent one (deadlock, serialization failure) is run again:
        every statement in it is idempotent."""
        for attempt in range(1, CLAIM_ATTEMPTS + 1):
            try:
                with session_scope(self.session_factory) as session:
                    return self._claim_rows(session, items, source)
            except DBAPIError as exc:
                sqlstate = getattr(exc.orig, "sqlstate", None)
                if sqlstate not in _RETRYABLE_SQLSTATES or attempt == CLAIM_ATTEMPTS:
                    raise
                log.warning("catalogue claim lost a race (SQLSTATE %s), attempt %d", sqlstate, attempt)
        raise AssertionError("unreachable")

    def _claim_rows(self, session: Session, items: list[_Prepared], source: str) -> tuple[set[int], list[str]]:
        # Rows are inserted sorted by their unique key, so that two concurrent batches take the index
        # locks in the same order and cannot deadlock on each other.
        now = utcnow()
        pseudonyms = sorted({item.pseudonym for item in items})
        session.execute(
            _insert_ignoring_conflicts(session, Patient, [{"pseudonym": p, "created_at": now} for p in pseudonyms])
        )
        entries: dict[tuple[str, str], dict[str, Any]] = {}
        for item in items:
            for kind, new, old, offset in item.reidentification:
                entries.setdefault(
                    (kind, new),
                    {"kind": kind, "pseudonym": new, "original": old, "date_offset_days": offset, "created_at": now},
                )
        session.execute(
            _insert_ignoring_conflicts(session, ReidentificationEntry, [entries[k] for k in sorted(entries)])
        )
        patient_ids = {
            pseudonym: patient_id
            for pseudonym, patient_id in session.execute(
                select(Patient.pseudonym, Patient.id).where(Patient.pseudonym.in_(pseudonyms))
            )
        }

        studies: dict[str, dict[str, Any]] = {}
        for item in items:
            studies.setdefault(
                item.study["study_instance_uid"], {**item.study, "patient_id": patient_ids[item.pseudonym]}
            )
        session.execute(_insert_ignoring_conflicts(session, Study, [studies[k] for k in sorted(studies)]))
        study_ids = {
            uid: study_id
            for uid, study_id in session.execute(
                select(Study.study_instance_uid, Study.id).where(Study.study_instance_uid.in_(list(studies)))
            )
        }

        series: dict[str, dict[str, Any]] = {}
        for item in items:
            series.setdefault(
                item.series["series_instance_uid"],
                {**item.series, "study_id": study_ids[item.outcome.study_instance_uid]},
            )
        session.execute(_insert_ignoring_conflicts(session, Series, [series[k] for k in sorted(series)]))
        series_ids = {
            uid: series_id
            for uid, series_id in session.execute(
                select(Series.series_instance_uid, Series.id).where(Series.series_instance_uid.in_(list(series)))
            )
        }
        # A series first seen without a SeriesDescription takes the one a later instance brings (routing only);
        # matches no row, and so locks none, once it is set.
        for uid, row in sorted(series.items()):
            if row["routing_description"]:
                session.execute(
                    update(Series)
                    .where(Series.series_instance_uid == uid, Series.routing_description.is_(None))
                    .values(routing_description=row["routing_description"])
                )

        by_uid = {item.outcome.sop_instance_uid: item for item in items}
        rows = [
            {**by_uid[uid].instance, "series_id": series_ids[by_uid[uid].outcome.series_instance_uid], "source": source}
            for uid in sorted(by_uid)
        ]
        inserted = set(
            session.scalars(
                _insert_ignoring_conflicts(session, Instance, rows).returning(Instance.sop_instance_uid)
            ).all()
        )
        conflicts: set[int] = set()
        for item in items:
            if item.outcome.sop_instance_uid in inserted:
                item.state = "pending"
        existing = [uid for uid in by_uid if uid not in inserted]
        if existing:  # delivered before (or concurrently): same content is a duplicate, other content a conflict
            for uid, digest, state in session.execute(
                select(Instance.sop_instance_uid, Instance.content_hash, Instance.state).where(
                    Instance.sop_instance_uid.in_(existing)
                )
            ):
                item = by_uid[uid]
                if digest != item.digest:
                    conflicts.add(item.index)
                else:
                    item.state = "stored" if state == "stored" else "pending"

        # A new instance (re)opens its series: the stability timer restarts and a new generation begins.
        # One statement each for all the series of the batch, not one per instance (the hot row).
        opened = sorted({series_ids[item.outcome.series_instance_uid] for item in items if item.state == "pending"})
        restarted: list[str] = []
        if opened:
            reopened = session.execute(
                update(Series)
                .where(Series.id.in_(opened), Series.status != "receiving")
                .values(status="receiving", generation=Series.generation + 1, last_received_at=now)
                .returning(Series.id, Series.series_instance_uid)
                .execution_options(synchronize_session=False)
            ).all()
            restarted = [uid for _, uid in reopened]
            still_open = sorted(set(opened) - {series_id for series_id, _ in reopened})
            if still_open:
                session.execute(
                    update(Series)
                    .where(Series.id.in_(still_open))
                    .values(last_received_at=now)
                    .execution_options(synchronize_session=False)
                )
        return conflicts, restarted

    def _mark_stored(self, sop_uids: list[str]) -> None:
        with session_scope(self.session_factory) as session:
            session.execute(
                update(Instance)
                .where(Instance.sop_instance_uid.in_(sorted(sop_uids)))
                .values(state="stored")
                .execution_options(synchronize_session=False)
            )

    # -- object storage -----------------------------------------------------------------------------

    def _pool(self) -> ThreadPoolExecutor:
        with self._puts_lock:
            if self._puts is None:
                self._puts = ThreadPoolExecutor(PARALLEL_PUTS, thread_name_prefix="ingest-put")
            return self._puts

    def _write(self, items: list[_Prepared]) -> list[InstanceRejectedError | None]:
        """Write the blobs, in parallel; None for each one written, else its storage error."""

        def put(item: _Prepared) -> InstanceRejectedError | None:
            try:
                self.store.put_stream(
                    item.key, item.encoded, item.encoded_size, "application/dicom", {"sha256": item.digest}
                )
            except Exception as exc:
                log.exception("object storage write failed for %s", item.key)
                return InstanceRejectedError(
                    RejectReason.STORAGE_ERROR,
                    f"storage unavailable: {exc}",
                    item.outcome.sop_class_uid,
                    item.outcome.original_sop_instance_uid,
                )
            return None

        if len(items) <= 1:
            return [put(item) for item in items]
        return list(self._pool().map(put, items))


def _one(outcomes: list[Outcome]) -> ReceivedInstance:
    (outcome,) = outcomes
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def _unreadable(exc: Exception, sop_class_uid: str, sop_instance_uid: str) -> InstanceRejectedError:
    return InstanceRejectedError(
        RejectReason.UNPARSEABLE,
        f"unreadable content: {type(exc).__name__}: {str(exc)[:300]}",
        sop_class_uid,
        sop_instance_uid,
    )


def _conflict(item: _Prepared) -> InstanceRejectedError:
    return InstanceRejectedError(
        RejectReason.CONFLICT,
        "an instance with this SOP Instance UID but different content is already stored",
        item.outcome.sop_class_uid,
        item.outcome.original_sop_instance_uid,
    )


def batches(count: int, size: int = BATCH_MAX_INSTANCES) -> Iterator[range]:
    """Index ranges cutting ``count`` items into batches of at most ``size``."""
    for start in range(0, count, size):
        yield range(start, min(start + size, count))
