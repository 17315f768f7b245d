"""Health and metrics of a training worker pod: ``uvicorn services.training_worker.main:app``.

The worker has no API of its own (round tasks arrive on its queue); this app only serves ``/healthz``,
``/readyz`` (database, object storage, broker) and ``/metrics`` for probes and Prometheus.
"""

from __future__ import annotations

from fastapi import FastAPI

from services.training_worker.context import SERVICE, TrainingWorkerContext
from services.training_worker.settings import TrainingWorkerSettings
from shared.service_app import build_service_app, lazy_app


def create_app(settings: TrainingWorkerSettings | None = None) -> FastAPI:
    settings = settings or TrainingWorkerSettings()
    ctx = TrainingWorkerContext(settings)
    return build_service_app(
        ctx,
        service=SERVICE,
        title=f"voxelflow training worker ({settings.site})",
        description="Probes and Prometheus metrics of a site's training worker; round tasks arrive on the "
        f"Celery queue {ctx.queue!r}.",
        dead_letters=False,
        queues=[ctx.queue],
    )


__getattr__ = lazy_app(create_app)
