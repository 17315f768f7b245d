"""Wiring of the aggregation API: ``uvicorn services.aggregation.main:app``."""

from __future__ import annotations

from fastapi import FastAPI

from services.aggregation.api.routes import federated_runs
from services.aggregation.context import SERVICE, AggregationContext
from services.aggregation.settings import AggregationSettings
from shared.service_app import build_service_app, lazy_app


def create_app(settings: AggregationSettings | None = None) -> FastAPI:
    settings = settings or AggregationSettings()
    return build_service_app(
        AggregationContext(settings),
        service=SERVICE,
        title="voxelflow aggregation",
        description="Federated training runs: dispatch rounds to the sites, aggregate their updates "
        "(FedAvg, FedProx, FedAdam, FedYogi; optional differential privacy), log to MLflow, register the model. "
        "Every request needs 'Authorization: Bearer <token>'.",
        routers=[federated_runs.router],
        queues=[settings.aggregation_queue],
    )


__getattr__ = lazy_app(create_app)
