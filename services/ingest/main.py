"""Wiring of the ingest API: ``uvicorn services.ingest.main:app``."""

from __future__ import annotations

from fastapi import FastAPI

from services.ingest.api.routes import catalogue, pacs, qido, stow, wado
from services.ingest.context import SERVICE, IngestContext
from services.ingest.settings import IngestSettings
from shared.http import create_service_app
from shared.observability.logging import configure_logging
from shared.tasks import dead_letter_router, register_queue_length_collector


def create_app(settings: IngestSettings | None = None) -> FastAPI:
    settings = settings or IngestSettings()
    configure_logging(SERVICE, settings.log_level, settings.log_json)
    ctx = IngestContext(settings)

    app = create_service_app(
        service=SERVICE,
        title="voxelflow ingest",
        description="PACS-facing DICOMweb API (STOW-RS, QIDO-RS, WADO-RS), pulls from a PACS, and the catalogue. "
        "Every request needs 'Authorization: Bearer <token>' (or HTTP Basic with the token as password).",
        version="0.1.0",
        session_factory=ctx.session_factory,
        max_request_bytes=settings.api_max_request_bytes,
        routers=[
            stow.router,
            qido.router,
            wado.router,
            pacs.router,
            catalogue.router,
            dead_letter_router(SERVICE, ctx.celery, ctx.session_factory),
        ],
        readiness_checks={
            "database": ctx.check_database,
            "object_storage": ctx.check_storage,
            "broker": ctx.check_broker,
        },
        startup=[ctx.migrate],
    )
    app.state.ctx = ctx
    register_queue_length_collector(settings.broker_url, [SERVICE])
    return app


def __getattr__(name: str) -> FastAPI:
    """``services.ingest.main:app`` builds the app from the environment on first access (uvicorn)."""
    if name == "app":
        return create_app()
    raise AttributeError(name)
