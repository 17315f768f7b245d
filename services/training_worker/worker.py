"""Celery entry point of a site's training worker.

``VOXELFLOW_SITE=site-a celery -A services.training_worker.worker worker -Q training.site-a -P solo -c 1``

The solo pool runs the round in the worker process itself: training already uses every core through
torch's threads, and not forking keeps CUDA and torch's thread pools sane. Killing the process loses
only the epoch in progress (the task is redelivered and resumes from ``checkpoint.pt``). Importing this
module does nothing; ``celery_app`` is built on first access (:class:`shared.worker.ServiceWorker`).
"""

from __future__ import annotations

from services.training_worker.context import TrainingWorkerContext
from services.training_worker.settings import TrainingWorkerSettings
from shared.worker import ServiceWorker


def _set_torch_threads(ctx: TrainingWorkerContext) -> None:
    if ctx.settings.torch_threads:
        import torch

        torch.set_num_threads(ctx.settings.torch_threads)


worker = ServiceWorker(
    lambda ctx: f"training-worker-{ctx.settings.site}",
    lambda: TrainingWorkerContext(TrainingWorkerSettings()),
    ["services.training_worker.tasks"],
    setup=_set_torch_threads,
)
worker_context = worker.context
__getattr__ = worker.module_getattr
