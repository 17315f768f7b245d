"""Wiring of the inference API: ``uvicorn services.inference.main:app``.

The lifespan loads and warms up the served model(s) before ``/readyz`` turns true (KServe style), so a
Kubernetes Service never routes a request to a replica that would answer it with a cold model.
"""

from __future__ import annotations

from fastapi import FastAPI

from services.inference.api.routes import model_exports, routing_rules, segmentations
from services.inference.context import SERVICE, InferenceContext
from services.inference.metrics import register_nvml_collector
from services.inference.model_server import ModelSource
from services.inference.settings import InferenceSettings
from shared.contracts.tasks import INFERENCE_QUEUE
from shared.service_app import build_service_app, lazy_app


def create_app(settings: InferenceSettings | None = None, model_source: ModelSource | None = None) -> FastAPI:
    ctx = InferenceContext(settings or InferenceSettings(), model_source)
    app = build_service_app(
        ctx,
        service=SERVICE,
        title="voxelflow inference",
        description="Segmentations from the registry's champion model (canary: candidate), as NIfTI, DICOM SEG "
        "and findings; DICOM SEG back to the PACS on request. Every request needs 'Authorization: Bearer <token>'.",
        routers=[segmentations.router, model_exports.router, routing_rules.router],
        extra_readiness_checks={"model": ctx.check_model},
        queues=[INFERENCE_QUEUE],
        # load + warm up before /readyz (the models are built on first use, not here); the watcher keeps polling
        startup=[lambda: ctx.models.start()],
        shutdown=[lambda: ctx.models.stop()],
    )
    register_nvml_collector()
    return app


__getattr__ = lazy_app(create_app)
