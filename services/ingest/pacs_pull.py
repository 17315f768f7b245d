"""Pulling studies from a configured PACS: find the studies and their series, retrieve series by series.

Two kinds of PACS sit behind one small interface, :class:`PacsSource`, chosen by the URL scheme of the
configured connection: DICOMweb (``http(s)://``: QIDO-RS to find, WADO-RS to retrieve) and DIMSE
(``dimse://AET@host:port``: C-FIND to find, C-MOVE or C-GET to retrieve; :mod:`services.ingest.pacs_dimse`).
Every retrieved instance goes through the same receiver as a STOW-RS upload, so validation,
de-identification and idempotency are identical whichever door it came through; re-running a pull is
harmless (what is already stored counts as stored again, nothing is written twice).

Every exchange with the PACS is written to the audit log (one row per find and per series retrieved, with
pseudonymised UIDs only); the whole pull runs inside the ``ingest.pull_from_pacs`` task time limit and
every single wait for the PACS is bounded by the connection's ``timeout_seconds``.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlencode, urlsplit, urlunsplit

from celery.exceptions import SoftTimeLimitExceeded
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from requests import HTTPError, RequestException
from sqlalchemy import select, update

from services.ingest.context import SERVICE, IngestContext
from services.ingest.models import Instance, PullJob
from services.ingest.settings import IngestSettings, PacsConnection
from services.ingest.validation import InstanceRejectedError
from shared.db.base import session_scope, utcnow
from shared.db.models import AuditEvent
from shared.tasks import PermanentTaskError

log = logging.getLogger("voxelflow.ingest.pull")

STATUS_SUCCESS = 0x0000
#: keys that select series within a study; every other key of a pull query selects studies
SERIES_KEYS = frozenset(
    {"SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined", "SeriesDate"}
)
STUDY_KEYS = frozenset(
    {
        "StudyInstanceUID",
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "StudyDescription",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
    }
)


class PullQueryError(ValueError):
    """A pull query key that neither QIDO-RS nor C-FIND of every PACS is sure to honour."""


class PacsUnavailableError(ConnectionError):
    """The PACS could not be reached, refused or dropped the association, or did not answer in time.

    A ConnectionError, so the task is retried with backoff (shared.tasks.RETRYABLE_ERRORS)."""


class PacsRefusedError(Exception):
    """The PACS answered, with a failure status that retrying will not change (a query it cannot do)."""


@dataclass
class Transfer:
    """What retrieving one series gave: instances now in the catalogue, instances that are not, why not."""

    stored: int = 0
    failed: int = 0
    status: int = STATUS_SUCCESS
    note: str | None = None


class Sink(Protocol):
    """Where a source puts what it retrieves, and how it checks what arrived by another path (C-MOVE)."""

    def store(self, dataset: Dataset, size: int | None = None) -> int:
        """Receive one instance; the DICOM status (0x0000 stored, else the refusal's failure status)."""

    def present(self, sop_instance_uids: Sequence[str]) -> set[str]:
        """Which of these original SOP Instance UIDs are stored in the catalogue."""


class PacsSource(Protocol):
    """The one interface a pull uses; a DICOMweb and a DIMSE implementation, tested by one contract suite."""

    #: the protocol's names for finding and retrieving (the audit log's ``method``)
    find_method: str
    retrieve_method: str
    #: where the PACS is, without credentials (the audit log's ``path``)
    address: str

    def find_studies(self, query: Mapping[str, str]) -> list[str]:
        """StudyInstanceUIDs matching study-level keys; [] when nothing matches."""

    def find_series(self, study_uid: str, query: Mapping[str, str]) -> list[str]:
        """SeriesInstanceUIDs of the study matching series-level keys; [] for an unknown study."""

    def retrieve_series(self, study_uid: str, series_uid: str, sink: Sink) -> Transfer:
        """Bring every instance of the series into ``sink``'s catalogue."""

    def close(self) -> None: ...


# ------------------------------------------------------------------------------------------ queries


def normalise_key(key: str) -> str:
    """A matching key given as a keyword or as an 8-digit tag, as its keyword."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", key):
        keyword = keyword_for_tag(int(key, 16))
        if keyword:
            return str(keyword)
    if tag_for_keyword(key) is None:
        raise PullQueryError(f"unknown attribute {key!r}")
    return key


def split_query(query: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(study-level keys, series-level keys) of a pull query, as keywords; PullQueryError for any other key.

    Only keys every PACS answers at its level are accepted: a DIMSE PACS is only required to match the
    Study Root model's unique and required keys, and a key it ignores would silently pull too much."""
    study: dict[str, str] = {}
    series: dict[str, str] = {}
    for raw_key, value in query.items():
        key = normalise_key(raw_key)
        if key in STUDY_KEYS:
            study[key] = value
        elif key in SERIES_KEYS:
            series[key] = value
        else:
            raise PullQueryError(
                f"{key} is not a pull matching key; study level: {', '.join(sorted(STUDY_KEYS))}; "
                f"series level: {', '.join(sorted(SERIES_KEYS))}"
            )
    return study, series


def dimse_identifier(level: str, keys: Mapping[str, str], returned: Sequence[str]) -> Dataset:
    """A C-FIND/C-MOVE/C-GET identifier: the QIDO values as DIMSE matching (comma-separated UID lists
    become multi-valued UI; wildcards and date ranges mean the same in both)."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword in returned:
        setattr(identifier, keyword, "")
    for keyword, value in keys.items():
        if dictionary_VR(keyword) == "UI" and "," in value:
            setattr(identifier, keyword, [v.strip() for v in value.split(",") if v.strip()])
        else:
            setattr(identifier, keyword, value)
    return identifier


# ------------------------------------------------------------------------------------------ DICOMweb


def dicomweb_client(connection: PacsConnection) -> DICOMwebClient:
    session = None
    if connection.username:
        password = connection.password.get_secret_value() if connection.password else ""
        session = create_session_from_user_pass(connection.username, password)
    return DICOMwebClient(url=connection.url, session=session, timeout=connection.timeout_seconds)


def _first(item: Mapping[str, Any], tag: str) -> str | None:
    values = item.get(tag, {}).get("Value") or []
    return str(values[0]) if values else None


class DicomwebSource:
    """QIDO-RS to find, WADO-RS to retrieve, asking for the instances as stored (``transfer-syntax=*``).

    As stored: since DICOM 2016c a WADO-RS server transcodes to Explicit VR Little Endian unless the client
    says otherwise, which for a JPEG 2000 CT would mean a slower pull of a four times larger copy."""

    find_method = "QIDO-RS"
    retrieve_method = "WADO-RS"

    def __init__(self, connection: PacsConnection) -> None:
        self.client = dicomweb_client(connection)
        self.timeout = connection.timeout_seconds
        parts = urlsplit(connection.url)
        self.address = urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))

    def find_studies(self, query: Mapping[str, str]) -> list[str]:
        with self._errors("QIDO-RS search for studies"):
            results = self._search("studies", query)
        return [uid for study in results if (uid := _first(study, "0020000D"))]

    def find_series(self, study_uid: str, query: Mapping[str, str]) -> list[str]:
        try:
            with self._errors("QIDO-RS search for series"):
                results = self._search(f"studies/{study_uid}/series", query)
        except PacsRefusedError as exc:
            if "HTTP 404" in str(exc):  # PS3.18: a search under an unknown study
                return []
            raise
        return [uid for series in results if (uid := _first(series, "0020000E"))]

    def _search(self, path: str, query: Mapping[str, str], page: int = 1000) -> list[dict[str, Any]]:
        """A QIDO-RS search, page by page. Written here rather than with dicomweb-client's search because
        that percent-encodes the matching characters ``*``, ``?`` and ``,``, which Orthanc 1.10's DICOMweb
        plugin then matches literally (RFC 3986 lets a query carry them as they are)."""
        results: list[dict[str, Any]] = []
        root = self.client.base_url.rstrip("/")
        while True:
            params = {**query, "limit": str(page), "offset": str(len(results))}
            response = self.client._session.get(
                f"{root}/{path}?{urlencode(params, safe='*?,')}",
                headers={"Accept": "application/dicom+json"},
                timeout=self.timeout,
            )
            if response.status_code == 204:
                return results
            response.raise_for_status()
            batch = response.json() or []
            results.extend(batch)
            if len(batch) < page:
                return results

    def retrieve_series(self, study_uid: str, series_uid: str, sink: Sink) -> Transfer:
        transfer = Transfer()
        with self._errors("WADO-RS retrieve series"):
            for dataset in self.client.iter_series(study_uid, series_uid, media_types=(("application/dicom", "*"),)):
                if sink.store(dataset) == STATUS_SUCCESS:
                    transfer.stored += 1
                else:
                    transfer.failed += 1
        if transfer.failed:
            transfer.note = f"{transfer.failed} instance(s) refused by ingest validation (see the ingest log)"
        return transfer

    def close(self) -> None:
        self.client._session.close()

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """HTTP errors as the pull's two kinds: a 4xx the PACS will give again is a refusal (no retry);
        a 5xx, 408, 429 or a network error is unavailability (retried)."""
        try:
            yield
        except HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            message = f"{what} at {self.address}: HTTP {status}"
            if 400 <= status < 500 and status not in (408, 429):
                raise PacsRefusedError(message) from exc
            raise PacsUnavailableError(message) from exc
        except RequestException as exc:
            raise PacsUnavailableError(f"{what} at {self.address}: {type(exc).__name__}: {exc}") from exc


# ------------------------------------------------------------------------------------------ the pull


def open_source(connection: PacsConnection, settings: IngestSettings) -> PacsSource:
    """The PacsSource the connection's URL scheme names."""
    if connection.protocol == "dimse":
        from services.ingest.pacs_dimse import DimseSource

        return DimseSource.from_connection(connection, settings)
    return DicomwebSource(connection)


class CatalogueSink:
    """Puts retrieved instances through the ingest receiver and answers which originals it holds."""

    def __init__(self, ctx: IngestContext) -> None:
        self.ctx = ctx

    def store(self, dataset: Dataset, size: int | None = None) -> int:
        if size is None:
            buffer = io.BytesIO()
            dcmwrite(buffer, dataset, enforce_file_format=True)
            size = buffer.tell()
        try:
            self.ctx.receiver.receive_dataset(dataset, size, source="pull")
        except InstanceRejectedError as exc:
            log.warning("pulled instance rejected: %s", exc.message, extra={"reason": exc.reason.value})
            return exc.failure_status
        return STATUS_SUCCESS

    def present(self, sop_instance_uids: Sequence[str]) -> set[str]:
        by_pseudonym = {self.ctx.deidentifier.pseudonymise_uid(uid): uid for uid in sop_instance_uids}
        found: set[str] = set()
        pseudonyms = list(by_pseudonym)
        with self.ctx.session_factory() as session:
            for start in range(0, len(pseudonyms), 500):
                found.update(
                    session.scalars(
                        select(Instance.sop_instance_uid).where(
                            Instance.sop_instance_uid.in_(pseudonyms[start : start + 500]), Instance.state == "stored"
                        )
                    )
                )
        return {by_pseudonym[p] for p in found}


class PullAudit:
    """One audit row per exchange with the PACS, under the operator who asked for the pull."""

    def __init__(self, ctx: IngestContext, job: PullJob, source: PacsSource) -> None:
        self.ctx, self.source = ctx, source
        self.job_id, self.principal = job.id, job.requested_by

    def __call__(self, method: str, uids: Sequence[str], status: int, ok: bool) -> None:
        pseudonymise = self.ctx.deidentifier.pseudonymise_uid
        parts = urlsplit(self.source.address)
        with session_scope(self.ctx.session_factory) as session:
            session.add(
                AuditEvent(
                    service=SERVICE,
                    request_id=self.job_id,
                    principal=self.principal,
                    role="operator",
                    method=method,
                    path=self.source.address,
                    object_uids=[pseudonymise(uid) for uid in uids][:1000],
                    status_code=status,
                    outcome="success" if ok else "failure",
                    client=f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname,
                )
            )


def _set_job(ctx: IngestContext, job_id: str, **values: Any) -> None:
    with session_scope(ctx.session_factory) as session:
        session.execute(update(PullJob).where(PullJob.id == job_id).values(**values))


@contextmanager
def _closing(source: PacsSource) -> Iterator[PacsSource]:
    try:
        yield source
    finally:
        source.close()


def pull(ctx: IngestContext, job_id: str, final_attempt: bool = True) -> PullJob:
    """Run one pull job. Idempotent: a job already done is returned as it is; a redelivered or retried one
    starts over and counts from zero (instances stored by the earlier attempt count as stored again).

    ``final_attempt`` False: a PACS that is unreachable leaves the job ``retrying`` (the task retries it);
    True: ``failed``, with the reason."""
    refusal: str | None = None
    with session_scope(ctx.session_factory) as session:
        job = session.get(PullJob, job_id)
        if job is None:
            raise PermanentTaskError(f"no pull job {job_id}")
        session.expunge(job)
    if job.status == "done":
        return job  # redelivered after completion
    connection = ctx.settings.pacs.get(job.pacs)
    study_keys: dict[str, str] = {}
    series_keys: dict[str, str] = {}
    if connection is None:
        refusal = f"PACS {job.pacs!r} is not configured"
    else:
        try:
            study_keys, series_keys = split_query(job.query)
        except PullQueryError as exc:
            refusal = str(exc)
    if refusal or connection is None:
        _set_job(ctx, job_id, status="failed", error=refusal, finished_at=utcnow())
        raise PermanentTaskError(refusal)
    _set_job(ctx, job_id, status="running", error=None, studies_found=0, instances_stored=0, instances_failed=0)

    counts = {"studies_found": 0, "instances_stored": 0, "instances_failed": 0}
    notes: list[str] = []
    try:
        with _closing(open_source(connection, ctx.settings)) as source:
            audit = PullAudit(ctx, job, source)
            _run(ctx, job_id, source, CatalogueSink(ctx), audit, (study_keys, series_keys), counts, notes)
    except SoftTimeLimitExceeded as exc:
        _set_job(ctx, job_id, status="failed", error=f"stopped: {exc}", finished_at=utcnow(), **counts)
        raise
    except PacsRefusedError as exc:
        _set_job(ctx, job_id, status="failed", error=str(exc), finished_at=utcnow(), **counts)
        raise PermanentTaskError(str(exc)) from exc
    except PacsUnavailableError as exc:
        status = "failed" if final_attempt else "retrying"
        _set_job(ctx, job_id, status=status, error=f"{type(exc).__name__}: {exc}"[:2000], **counts)
        raise
    _set_job(ctx, job_id, status="done", finished_at=utcnow(), error="; ".join(notes)[:2000] or None, **counts)
    with session_scope(ctx.session_factory) as session:
        done = session.get(PullJob, job_id)
        assert done is not None
        session.expunge(done)
        return done


def _run(
    ctx: IngestContext,
    job_id: str,
    source: PacsSource,
    sink: Sink,
    audit: PullAudit,
    keys: tuple[dict[str, str], dict[str, str]],
    counts: dict[str, int],
    notes: list[str],
) -> None:
    study_keys, series_keys = keys
    studies = source.find_studies(study_keys)
    audit(source.find_method, studies, STATUS_SUCCESS, True)
    counts["studies_found"] = len(studies)
    _set_job(ctx, job_id, **counts)
    for study_uid in studies:
        series_uids = source.find_series(study_uid, series_keys)
        audit(source.find_method, [study_uid, *series_uids], STATUS_SUCCESS, True)
        for series_uid in series_uids:
            transfer = source.retrieve_series(study_uid, series_uid, sink)
            audit(source.retrieve_method, [study_uid, series_uid], transfer.status, not transfer.failed)
            counts["instances_stored"] += transfer.stored
            counts["instances_failed"] += transfer.failed
            if transfer.note:
                notes.append(f"series {ctx.deidentifier.pseudonymise_uid(series_uid)}: {transfer.note}")
            _set_job(ctx, job_id, **counts)
