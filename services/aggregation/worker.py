"""Celery entry point of the aggregator: ``celery -A services.aggregation.worker worker -Q aggregation``.

When a worker starts it takes over every unfinished run: that is how a killed aggregator resumes (its
in-flight message would otherwise wait for the broker's visibility timeout).
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from celery import signals

from services.aggregation.context import AggregationContext
from services.aggregation.settings import AggregationSettings
from shared.observability.logging import configure_logging


@lru_cache(maxsize=1)
def worker_context() -> AggregationContext:
    return AggregationContext(AggregationSettings())


settings = worker_context().settings
configure_logging("aggregation-worker", settings.log_level, settings.log_json)
celery_app = worker_context().celery
if settings.metrics_port:
    from prometheus_client import start_http_server

    start_http_server(settings.metrics_port)

import services.aggregation.metrics  # noqa: E402  (declared at start: scraped before the first round)
import services.aggregation.tasks  # noqa: E402,F401  (registers the tasks)


@signals.worker_ready.connect
def _resume_runs(sender: Any = None, **_: Any) -> None:
    from services.aggregation.run_orchestration import resume_running_runs

    if sender is not None and getattr(sender, "app", celery_app) is not celery_app:
        return  # another Celery app's worker in the same process
    ctx = worker_context()
    resumed = resume_running_runs(ctx)
    if resumed:
        logging.getLogger("voxelflow.aggregation").info("resuming federated runs %s", resumed)
