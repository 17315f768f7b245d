"""Wiring of the model-registry API: ``uvicorn services.model_registry.main:app``."""

from __future__ import annotations

from fastapi import FastAPI

from services.model_registry.api.routes import models
from services.model_registry.context import SERVICE, ModelRegistryContext
from services.model_registry.settings import ModelRegistrySettings
from shared.service_app import build_service_app, lazy_app


def create_app(settings: ModelRegistrySettings | None = None) -> FastAPI:
    ctx = ModelRegistryContext(settings or ModelRegistrySettings())
    return build_service_app(
        ctx,
        service=SERVICE,
        title="voxelflow model registry",
        description="Registered segmentation models (MLflow): versions with lineage, comparison, and promotion "
        "to champion through a statistical gate. Every request needs 'Authorization: Bearer <token>'. "
        f"MLflow UI: {ctx.ui_url}",
        routers=[models.router],
        # no Celery, no object storage: MLflow is the registry's only dependency besides the database
        readiness_checks={"database": ctx.check_database, "mlflow": ctx.check_mlflow},
        dead_letters=False,
    )


__getattr__ = lazy_app(create_app)
