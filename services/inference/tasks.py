"""Thin Celery tasks of the inference service: they take a request ID and call domain code."""

from __future__ import annotations

from typing import Any

from celery import shared_task
from celery.exceptions import Retry

from shared.contracts.tasks import EXPORT_MODEL, ROUTE_SERIES, SEGMENT, limits
from shared.tasks import RETRYABLE_ERRORS


@shared_task(name=SEGMENT.name, bind=True, **limits(SEGMENT))
def segment_task(self: Any, request_id: str) -> dict[str, Any]:
    """Idempotent by request ID: a finished request is returned as is; a rerun rewrites the same outputs."""
    from services.inference.admission import OverloadedError
    from services.inference.model_lifecycle import ModelUnavailableError
    from services.inference.pacs_upload import PacsRefusedError
    from services.inference.segment_request import run_request
    from services.inference.sources import SourceError
    from services.inference.worker import worker_context
    from shared.tasks import PermanentTaskError

    ctx = worker_context()
    if not ctx.models.ready:
        ctx.models.start()
    try:
        try:
            row = run_request(ctx, request_id, "async")
        except (OverloadedError, ModelUnavailableError) as exc:  # transient: come back later
            if self.request.retries >= OVERLOAD_RETRIES:
                raise
            raise self.retry(exc=exc, countdown=getattr(exc, "retry_after", 10), max_retries=OVERLOAD_RETRIES) from exc
        except (SourceError, ValueError, PacsRefusedError) as exc:
            raise PermanentTaskError(f"{type(exc).__name__}: {exc}") from exc
    except Retry:
        raise
    except Exception as exc:
        # the last attempt (permanent, not retryable, or retries spent): a routed request records its failure
        retryable = isinstance(exc, RETRYABLE_ERRORS) and self.request.retries < self.max_retries
        if not retryable:
            _record_failure(ctx, request_id, exc)
        raise
    return {"request_id": row.id, "status": row.status, "model_version": row.model_version}


OVERLOAD_RETRIES = 20


def _record_failure(ctx: Any, request_id: str, exc: BaseException) -> None:
    """The job's last attempt failed (a dead letter follows): the row ends ``failed``; a routed request audits it."""
    from services.inference.models import SegmentationRequest
    from services.inference.routing_steps import record_step
    from shared.tasks import PermanentTaskError

    with ctx.session_factory() as session:
        row = session.get(SegmentationRequest, request_id)
        if row is None:
            return
        if row.status in ("queued", "running", "retrying"):  # given up: the row says so, not "retrying" for ever
            row.status = "failed"
            session.commit()
    kind = "permanent" if isinstance(exc, PermanentTaskError) else "given up"
    record_step(
        ctx, "FAILED", request_id=request_id, options=row.options, series_uid=row.source_ref, detail=f"{kind}: {exc}"
    )


@shared_task(name=ROUTE_SERIES.name, bind=True, **limits(ROUTE_SERIES))
def route_series_task(self: Any, message: dict[str, Any]) -> dict[str, Any]:
    """Idempotent by (rule, series): a redelivered offer finds its requests again (see series_routing)."""
    from services.inference.series_routing import route_series
    from services.inference.worker import worker_context
    from shared.contracts import messages
    from shared.proto.voxelflow.v1.ingest_pb2 import SeriesIngested
    from shared.tasks import PermanentTaskError

    try:
        series = messages.from_dict(message, SeriesIngested)
    except messages.MessageError as exc:
        raise PermanentTaskError(f"not a SeriesIngested message: {exc}") from exc
    request_ids = route_series(worker_context(), series)
    return {"series_instance_uid": series.series_instance_uid, "requests": request_ids}


@shared_task(name=EXPORT_MODEL.name, bind=True, **limits(EXPORT_MODEL))
def export_model_task(self: Any, export_id: str) -> dict[str, Any]:
    """Idempotent by export ID (see :mod:`services.inference.model_exports`)."""
    from services.inference.model_exports import ExportRefusedError, run_export
    from services.inference.worker import worker_context
    from shared.tasks import PermanentTaskError

    try:
        row = run_export(worker_context(), export_id)
    except ExportRefusedError as exc:
        raise PermanentTaskError(str(exc)) from exc
    return {"export_id": row.id, "status": row.status}
