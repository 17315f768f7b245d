"""Celery entry point: ``celery -A services.preprocessing.worker worker -Q preprocessing``.

Importing this module does nothing; ``celery_app`` is built on first access (:class:`shared.worker.ServiceWorker`).
"""

from __future__ import annotations

from services.preprocessing.context import PreprocessingContext
from services.preprocessing.settings import PreprocessingSettings
from shared.worker import ServiceWorker

worker = ServiceWorker(
    "preprocessing-worker",
    lambda: PreprocessingContext(PreprocessingSettings()),
    # metrics first: declared at start, so dashboards see zeros, not "no data"
    ["services.preprocessing.metrics", "services.preprocessing.tasks"],
)
worker_context = worker.context
__getattr__ = worker.module_getattr
