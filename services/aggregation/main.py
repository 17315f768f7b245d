"""Wiring of the aggregation API: ``uvicorn services.aggregation.main:app``."""

from __future__ import annotations

from fastapi import FastAPI

from services.aggregation.api.routes import federated_runs
from services.aggregation.context import SERVICE, AggregationContext
from services.aggregation.settings import AggregationSettings
from shared.http import create_service_app
from shared.observability.logging import configure_logging
from shared.tasks import dead_letter_router, register_queue_length_collector


def create_app(settings: AggregationSettings | None = None) -> FastAPI:
    settings = settings or AggregationSettings()
    configure_logging(SERVICE, settings.log_level, settings.log_json)
    ctx = AggregationContext(settings)

    app = create_service_app(
        service=SERVICE,
        title="voxelflow aggregation",
        description="Federated training runs: dispatch rounds to the sites, aggregate their updates "
        "(FedAvg, FedProx, FedAdam, FedYogi; optional differential privacy), log to MLflow, register the model. "
        "Every request needs 'Authorization: Bearer <token>'.",
        version="0.1.0",
        session_factory=ctx.session_factory,
        max_request_bytes=settings.api_max_request_bytes,
        routers=[federated_runs.router, dead_letter_router(SERVICE, ctx.celery, ctx.session_factory)],
        readiness_checks={
            "database": ctx.check_database,
            "object_storage": ctx.check_storage,
            "broker": ctx.check_broker,
        },
        startup=[ctx.migrate],
    )
    app.state.ctx = ctx
    register_queue_length_collector(settings.broker_url, [settings.aggregation_queue])
    return app


def __getattr__(name: str) -> FastAPI:
    """``services.aggregation.main:app`` builds the app from the environment on first access (uvicorn)."""
    if name == "app":
        return create_app()
    raise AttributeError(name)
