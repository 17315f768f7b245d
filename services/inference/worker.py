"""Celery entry point of the inference service: ``celery -A services.inference.worker worker -Q inference``.

The worker serves the same aliases as the API (its own :class:`ModelManager`, started on the first job).
"""

from __future__ import annotations

from services.inference.context import InferenceContext
from services.inference.settings import InferenceSettings
from shared.observability.logging import configure_logging

_context: InferenceContext | None = None


def worker_context() -> InferenceContext:
    global _context
    if _context is None:
        _context = InferenceContext(InferenceSettings())
    return _context


def use_context(ctx: InferenceContext) -> None:
    """Run this process's tasks on an existing context (an API process that also consumes jobs; tests)."""
    global _context
    _context = ctx


settings = InferenceSettings()
configure_logging("inference-worker", settings.log_level, settings.log_json)
celery_app = InferenceContext(settings).celery
if settings.metrics_port:
    from prometheus_client import start_http_server

    from services.inference.metrics import register_nvml_collector

    register_nvml_collector()
    start_http_server(settings.metrics_port)

import services.inference.tasks  # noqa: E402,F401  (registers the tasks)
