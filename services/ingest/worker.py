"""Celery entry point of the ingest service: ``celery -A services.ingest.worker worker -Q ingest``."""

from __future__ import annotations

from functools import lru_cache

from services.ingest.context import IngestContext
from services.ingest.settings import IngestSettings
from shared.observability.logging import configure_logging


@lru_cache(maxsize=1)
def worker_context() -> IngestContext:
    return IngestContext(IngestSettings())


settings = worker_context().settings
configure_logging("ingest-worker", settings.log_level, settings.log_json)
celery_app = worker_context().celery
if settings.metrics_port:
    from prometheus_client import start_http_server

    start_http_server(settings.metrics_port)

import services.ingest.tasks  # noqa: E402,F401  (registers the tasks)
