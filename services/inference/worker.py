"""Celery entry point of the inference service: ``celery -A services.inference.worker worker -Q inference``.

The worker serves the same aliases as the API (its own :class:`ModelManager`, started on the first job).
Importing this module does nothing; ``celery_app`` is built on first access (:class:`shared.worker.ServiceWorker`).
"""

from __future__ import annotations

from services.inference.context import InferenceContext
from services.inference.settings import InferenceSettings
from shared.worker import ServiceWorker


def _gpu_metrics(ctx: InferenceContext) -> None:
    if ctx.settings.metrics_port:
        from services.inference.metrics import register_nvml_collector

        register_nvml_collector()


worker = ServiceWorker(
    "inference-worker",
    lambda: InferenceContext(InferenceSettings()),
    ["services.inference.tasks"],
    migrate=False,
    setup=_gpu_metrics,
)
worker_context = worker.context
use_context = worker.use_context
__getattr__ = worker.module_getattr
