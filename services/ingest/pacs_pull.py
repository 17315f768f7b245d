"""Pulling studies from a configured PACS over DICOMweb (QIDO-RS to find, WADO-RS to retrieve).

Each retrieved instance goes through the same receiver as a STOW-RS upload, so validation,
de-identification and idempotency are identical; re-running a pull is harmless.
"""

from __future__ import annotations

import io
import logging
from typing import Any

from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
from pydicom.filewriter import dcmwrite
from sqlalchemy import update

from services.ingest.context import IngestContext
from services.ingest.models import PullJob
from services.ingest.settings import PacsConnection
from services.ingest.validation import InstanceRejectedError
from shared.db.base import session_scope, utcnow
from shared.tasks import PermanentTaskError

log = logging.getLogger("voxelflow.ingest.pull")


def dicomweb_client(connection: PacsConnection) -> DICOMwebClient:
    session = None
    if connection.username:
        password = connection.password.get_secret_value() if connection.password else ""
        session = create_session_from_user_pass(connection.username, password)
    return DICOMwebClient(url=connection.url, session=session)


def find_studies(client: DICOMwebClient, query: dict[str, Any]) -> list[str]:
    """StudyInstanceUIDs matching ``query`` (a StudyInstanceUID alone needs no search)."""
    if set(query) == {"StudyInstanceUID"}:
        return [str(query["StudyInstanceUID"])]
    results = client.search_for_studies(search_filters=query, get_remaining=True)
    return [study["0020000D"]["Value"][0] for study in results]


def pull(ctx: IngestContext, job_id: str) -> PullJob:
    with session_scope(ctx.session_factory) as session:
        job = session.get(PullJob, job_id)
        if job is None:
            raise PermanentTaskError(f"no pull job {job_id}")
        if job.status == "done":
            return job  # redelivered after completion
        connection = ctx.settings.pacs.get(job.pacs)
        if connection is None:
            job.status, job.error = "failed", f"PACS {job.pacs!r} is not configured"
            raise PermanentTaskError(job.error)
        job.status = "running"
        query = dict(job.query)

    client = dicomweb_client(connection)
    studies = find_studies(client, query)
    stored = failed = 0
    for study_uid in studies:
        for dataset in client.iter_study(study_uid):
            buffer = io.BytesIO()
            dcmwrite(buffer, dataset, enforce_file_format=True)
            try:
                ctx.receiver.receive_dataset(dataset, buffer.tell(), source="pull")
                stored += 1
            except InstanceRejectedError as exc:
                failed += 1
                log.warning("pulled instance rejected: %s", exc.message, extra={"reason": exc.reason.value})
        with session_scope(ctx.session_factory) as session:
            session.execute(
                update(PullJob)
                .where(PullJob.id == job_id)
                .values(studies_found=len(studies), instances_stored=stored, instances_failed=failed)
            )
    with session_scope(ctx.session_factory) as session:
        job = session.get(PullJob, job_id)
        assert job is not None
        job.status, job.finished_at = "done", utcnow()
        job.studies_found, job.instances_stored, job.instances_failed = len(studies), stored, failed
        return job
