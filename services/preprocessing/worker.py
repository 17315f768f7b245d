"""Celery entry point: ``celery -A services.preprocessing.worker worker -Q preprocessing``."""

from __future__ import annotations

from functools import lru_cache

from services.preprocessing.context import PreprocessingContext
from services.preprocessing.settings import PreprocessingSettings
from shared.observability.logging import configure_logging


@lru_cache(maxsize=1)
def worker_context() -> PreprocessingContext:
    ctx = PreprocessingContext(PreprocessingSettings())
    ctx.migrate()  # a worker may start before the API has created the tables
    return ctx


settings = worker_context().settings
configure_logging("preprocessing-worker", settings.log_level, settings.log_json)
celery_app = worker_context().celery
if settings.metrics_port:
    from prometheus_client import start_http_server

    start_http_server(settings.metrics_port)

import services.preprocessing.metrics  # noqa: E402  (declared at start: dashboards see zeros, not "no data")
import services.preprocessing.tasks  # noqa: E402,F401  (registers the tasks)
