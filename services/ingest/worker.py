"""Celery entry point of the ingest service: ``celery -A services.ingest.worker worker -Q ingest``.

Importing this module does nothing; ``celery_app`` is built on first access (:class:`shared.worker.ServiceWorker`).
"""

from __future__ import annotations

from services.ingest.context import IngestContext
from services.ingest.settings import IngestSettings
from shared.worker import ServiceWorker

worker = ServiceWorker(
    "ingest-worker", lambda: IngestContext(IngestSettings()), ["services.ingest.tasks"], migrate=False
)
worker_context = worker.context
__getattr__ = worker.module_getattr
