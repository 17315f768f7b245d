"""Wiring of the inference API: ``uvicorn services.inference.main:app``.

The lifespan loads and warms up the served model(s) before ``/readyz`` turns true (KServe style), so a
Kubernetes Service never routes a request to a replica that would answer it with a cold model.
"""

from __future__ import annotations

from fastapi import FastAPI

from services.inference.api.routes import model_exports, segmentations
from services.inference.context import SERVICE, InferenceContext
from services.inference.metrics import register_nvml_collector
from services.inference.model_server import ModelSource
from services.inference.settings import InferenceSettings
from shared.http import create_service_app
from shared.observability.logging import configure_logging
from shared.tasks import dead_letter_router, register_queue_length_collector


def create_app(settings: InferenceSettings | None = None, model_source: ModelSource | None = None) -> FastAPI:
    settings = settings or InferenceSettings()
    configure_logging(SERVICE, settings.log_level, settings.log_json)
    ctx = InferenceContext(settings, model_source)

    app = create_service_app(
        service=SERVICE,
        title="voxelflow inference",
        description="Segmentations from the registry's champion model (canary: candidate), as NIfTI, DICOM SEG "
        "and findings; DICOM SEG back to the PACS on request. Every request needs 'Authorization: Bearer <token>'.",
        version="0.1.0",
        session_factory=ctx.session_factory,
        max_request_bytes=settings.api_max_request_bytes,
        routers=[
            segmentations.router,
            model_exports.router,
            dead_letter_router(SERVICE, ctx.celery, ctx.session_factory),
        ],
        readiness_checks={
            "database": ctx.check_database,
            "object_storage": ctx.check_storage,
            "broker": ctx.check_broker,
            "model": ctx.check_model,
        },
        # load + warm up before /readyz (the models are built on first use, not here); the watcher keeps polling
        startup=[ctx.migrate, lambda: ctx.models.start()],
        shutdown=[lambda: ctx.models.stop()],
    )
    app.state.ctx = ctx
    register_queue_length_collector(settings.broker_url, [SERVICE])
    register_nvml_collector()
    return app


def __getattr__(name: str) -> FastAPI:
    """``services.inference.main:app`` builds the app from the environment on first access (uvicorn)."""
    if name == "app":
        return create_app()
    raise AttributeError(name)
