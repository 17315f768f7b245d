"""Wiring of the preprocessing API: ``uvicorn services.preprocessing.main:app``."""

from __future__ import annotations

from fastapi import FastAPI

from services.preprocessing.api.routes import cases, datasets
from services.preprocessing.context import SERVICE, PreprocessingContext
from services.preprocessing.settings import PreprocessingSettings
from shared.service_app import build_service_app, lazy_app


def create_app(settings: PreprocessingSettings | None = None) -> FastAPI:
    settings = settings or PreprocessingSettings()
    return build_service_app(
        PreprocessingContext(settings),
        service=SERVICE,
        title="voxelflow preprocessing",
        description="Candidate cases, versioned datasets (sites, splits, QC) and cached preprocessing. "
        "Every request needs 'Authorization: Bearer <token>' (researcher or operator).",
        routers=[cases.router, datasets.router],
        queues=[settings.preprocessing_queue],
    )


__getattr__ = lazy_app(create_app)
