"""Wiring of the ingest API: ``uvicorn services.ingest.main:app``."""

from __future__ import annotations

from fastapi import FastAPI

from services.ingest.api.routes import catalogue, pacs, qido, stow, wado
from services.ingest.context import SERVICE, IngestContext
from services.ingest.settings import IngestSettings
from shared.contracts.tasks import INGEST_QUEUE
from shared.service_app import build_service_app, lazy_app


def create_app(settings: IngestSettings | None = None) -> FastAPI:
    return build_service_app(
        IngestContext(settings or IngestSettings()),
        service=SERVICE,
        title="voxelflow ingest",
        description="PACS-facing DICOMweb API (STOW-RS, QIDO-RS, WADO-RS), pulls from a PACS, and the catalogue. "
        "Every request needs 'Authorization: Bearer <token>' (or HTTP Basic with the token as password).",
        routers=[stow.router, qido.router, wado.router, pacs.router, catalogue.router],
        queues=[INGEST_QUEUE],
    )


__getattr__ = lazy_app(create_app)
