"""Wiring of the preprocessing API: ``uvicorn services.preprocessing.main:app``."""

from __future__ import annotations

from fastapi import FastAPI

from services.preprocessing.api.routes import cases, datasets
from services.preprocessing.context import SERVICE, PreprocessingContext
from services.preprocessing.settings import PreprocessingSettings
from shared.http import create_service_app
from shared.observability.logging import configure_logging
from shared.tasks import dead_letter_router, register_queue_length_collector


def create_app(settings: PreprocessingSettings | None = None) -> FastAPI:
    settings = settings or PreprocessingSettings()
    configure_logging(SERVICE, settings.log_level, settings.log_json)
    ctx = PreprocessingContext(settings)

    app = create_service_app(
        service=SERVICE,
        title="voxelflow preprocessing",
        description="Candidate cases, versioned datasets (sites, splits, QC) and cached preprocessing. "
        "Every request needs 'Authorization: Bearer <token>' (researcher or operator).",
        version="0.1.0",
        session_factory=ctx.session_factory,
        max_request_bytes=settings.api_max_request_bytes,
        routers=[cases.router, datasets.router, dead_letter_router(SERVICE, ctx.celery, ctx.session_factory)],
        readiness_checks={
            "database": ctx.check_database,
            "object_storage": ctx.check_storage,
            "broker": ctx.check_broker,
        },
        startup=[ctx.migrate],
    )
    app.state.ctx = ctx
    register_queue_length_collector(settings.broker_url, [settings.preprocessing_queue])
    return app


def __getattr__(name: str) -> FastAPI:
    """``services.preprocessing.main:app`` builds the app from the environment on first access (uvicorn)."""
    if name == "app":
        return create_app()
    raise AttributeError(name)
