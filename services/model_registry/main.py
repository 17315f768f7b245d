"""Wiring of the model-registry API: ``uvicorn services.model_registry.main:app``."""

from __future__ import annotations

from fastapi import FastAPI

from services.model_registry.api.routes import models
from services.model_registry.context import SERVICE, ModelRegistryContext
from services.model_registry.settings import ModelRegistrySettings
from shared.http import create_service_app
from shared.observability.logging import configure_logging


def create_app(settings: ModelRegistrySettings | None = None) -> FastAPI:
    settings = settings or ModelRegistrySettings()
    configure_logging(SERVICE, settings.log_level, settings.log_json)
    ctx = ModelRegistryContext(settings)

    app = create_service_app(
        service=SERVICE,
        title="voxelflow model registry",
        description="Registered segmentation models (MLflow): versions with lineage, comparison, and promotion "
        "to champion through a statistical gate. Every request needs 'Authorization: Bearer <token>'. "
        f"MLflow UI: {ctx.ui_url}",
        version="0.1.0",
        session_factory=ctx.session_factory,
        max_request_bytes=settings.api_max_request_bytes,
        routers=[models.router],
        readiness_checks={"database": ctx.check_database, "mlflow": ctx.check_mlflow},
        startup=[ctx.migrate],
    )
    app.state.ctx = ctx
    return app


def __getattr__(name: str) -> FastAPI:
    """``services.model_registry.main:app`` builds the app from the environment on first access (uvicorn)."""
    if name == "app":
        return create_app()
    raise AttributeError(name)
