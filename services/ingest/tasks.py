"""Thin Celery tasks of the ingest service: they take IDs and call domain code."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from shared.contracts.tasks import FINALIZE_SERIES, PULL_FROM_PACS, limits


def _context() -> Any:
    from services.ingest.worker import worker_context

    return worker_context()


@shared_task(name=FINALIZE_SERIES.name, bind=True, **limits(FINALIZE_SERIES))
def finalize_series_task(self: Any, series_uid: str) -> str:
    from services.ingest.series_completion import finalize_series

    ctx = _context()
    outcome = finalize_series(ctx, series_uid)
    if outcome.state == "not_stable":
        ctx.schedule_series_check(series_uid, delay=outcome.retry_in_seconds + 0.1)
    return outcome.state


@shared_task(name=PULL_FROM_PACS.name, bind=True, **limits(PULL_FROM_PACS))
def pull_from_pacs_task(self: Any, job_id: str) -> dict[str, Any]:
    from services.ingest.pacs_pull import pull

    # the last delivery marks the job failed when the PACS stays unreachable; earlier ones leave it retrying
    job = pull(_context(), job_id, final_attempt=self.request.retries >= self.max_retries)
    return {"job_id": job.id, "status": job.status, "instances_stored": job.instances_stored}
