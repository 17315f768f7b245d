"""Health and metrics of a training worker pod: ``uvicorn services.training_worker.main:app``.

The worker has no API of its own (round tasks arrive on its queue); this app only serves ``/healthz``,
``/readyz`` (database, object storage, broker) and ``/metrics`` for probes and Prometheus.
"""

from __future__ import annotations

from fastapi import FastAPI

from services.training_worker.context import SERVICE, TrainingWorkerContext
from services.training_worker.settings import TrainingWorkerSettings
from shared.http import create_service_app
from shared.observability.logging import configure_logging
from shared.tasks import register_queue_length_collector

_app: FastAPI | None = None


def create_app(settings: TrainingWorkerSettings | None = None) -> FastAPI:
    settings = settings or TrainingWorkerSettings()
    configure_logging(SERVICE, settings.log_level, settings.log_json)
    ctx = TrainingWorkerContext(settings)

    app = create_service_app(
        service=SERVICE,
        title=f"voxelflow training worker ({settings.site})",
        description="Probes and Prometheus metrics of a site's training worker; round tasks arrive on the "
        f"Celery queue {ctx.queue!r}.",
        version="0.1.0",
        session_factory=ctx.session_factory,
        max_request_bytes=settings.api_max_request_bytes,
        routers=[],
        readiness_checks={
            "database": ctx.check_database,
            "object_storage": ctx.check_storage,
            "broker": ctx.check_broker,
        },
        startup=[ctx.migrate],
    )
    app.state.ctx = ctx
    register_queue_length_collector(settings.broker_url, [ctx.queue])
    return app


def __getattr__(name: str) -> FastAPI:
    """``services.training_worker.main:app`` builds the app from the environment once (uvicorn)."""
    global _app
    if name == "app":
        if _app is None:
            _app = create_app()
        return _app
    raise AttributeError(name)
