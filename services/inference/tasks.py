"""Thin Celery tasks of the inference service: they take a request ID and call domain code."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from shared.contracts.tasks import EXPORT_MODEL, SEGMENT, limits


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
        row = run_request(ctx, request_id, "async")
    except (OverloadedError, ModelUnavailableError) as exc:  # transient: come back later
        raise self.retry(exc=exc, countdown=getattr(exc, "retry_after", 10), max_retries=20) from exc
    except (SourceError, ValueError, PacsRefusedError) as exc:
        raise PermanentTaskError(f"{type(exc).__name__}: {exc}") from exc
    return {"request_id": row.id, "status": row.status, "model_version": row.model_version}


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
