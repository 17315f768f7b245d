"""Celery entry point of a site's training worker.

``VOXELFLOW_SITE=site-a celery -A services.training_worker.worker worker -Q training.site-a -P solo -c 1``

The solo pool runs the round in the worker process itself: training already uses every core through
torch's threads, and not forking keeps CUDA and torch's thread pools sane. Killing the process loses
only the epoch in progress (the task is redelivered and resumes from ``checkpoint.pt``).
"""

from __future__ import annotations

from functools import lru_cache

from services.training_worker.context import TrainingWorkerContext
from services.training_worker.settings import TrainingWorkerSettings
from shared.observability.logging import configure_logging


@lru_cache(maxsize=1)
def worker_context() -> TrainingWorkerContext:
    return TrainingWorkerContext(TrainingWorkerSettings())


settings = worker_context().settings
configure_logging(f"training-worker-{settings.site}", settings.log_level, settings.log_json)
if settings.torch_threads:
    import torch

    torch.set_num_threads(settings.torch_threads)
worker_context().migrate()  # dead letters need the shared tables; idempotent
celery_app = worker_context().celery
if settings.metrics_port:
    from prometheus_client import start_http_server

    start_http_server(settings.metrics_port)

import services.training_worker.tasks  # noqa: E402,F401  (registers the task)
