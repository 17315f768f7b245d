"""Celery entry point of the aggregator: ``celery -A services.aggregation.worker worker -Q aggregation``.

When a worker starts it takes over every unfinished run: that is how a killed aggregator resumes (its
in-flight message would otherwise wait for the broker's visibility timeout). Importing this module does
nothing; ``celery_app`` is built on first access (:class:`shared.worker.ServiceWorker`).
"""

from __future__ import annotations

import logging

from services.aggregation.context import AggregationContext
from services.aggregation.settings import AggregationSettings
from shared.worker import ServiceWorker


def _resume_runs(ctx: AggregationContext) -> None:
    from services.aggregation.run_orchestration import resume_running_runs

    resumed = resume_running_runs(ctx)
    if resumed:
        logging.getLogger("voxelflow.aggregation").info("resuming federated runs %s", resumed)


worker = ServiceWorker(
    "aggregation-worker",
    lambda: AggregationContext(AggregationSettings()),
    # metrics first: declared at start, so they are scraped before the first round
    ["services.aggregation.metrics", "services.aggregation.tasks"],
    migrate=False,
    on_ready=_resume_runs,
)
worker_context = worker.context
__getattr__ = worker.module_getattr
