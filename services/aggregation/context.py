"""Everything a request handler or task of the aggregation service needs, built once per process."""

from __future__ import annotations

import subprocess
import uuid
from dataclasses import dataclass
from functools import cached_property

from celery import Celery

from services.aggregation import models
from services.aggregation.settings import AggregationSettings
from shared.contracts.progress import ProgressPublisher
from shared.contracts.tasks import ADVANCE_RUN_TASK, training_queue
from shared.service_context import ServiceContext
from shared.tasks import create_celery_app

SERVICE = "aggregation"


@dataclass
class AggregationContext(ServiceContext):
    settings: AggregationSettings
    service_models = models

    @cached_property
    def celery(self) -> Celery:
        return create_celery_app(SERVICE, self.settings.broker_url, self.settings.database_url)

    @cached_property
    def git_sha(self) -> str:
        if self.settings.git_sha:
            return self.settings.git_sha
        try:
            return subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=5
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "unknown"

    @cached_property
    def progress(self) -> ProgressPublisher:
        """Round-level events of the run's event stream (shared.contracts.progress; the sites add epochs)."""
        return ProgressPublisher(self.settings.broker_url)

    def training_queue(self, site: str) -> str:
        return training_queue(site, self.settings.training_queue_prefix)

    def kick(self, run_id: str, task_id: str | None = None, force: bool = False) -> str:
        """Send ``aggregation.advance_run`` for a run; ``force`` takes the polling chain over (recovery)."""
        task_id = task_id or uuid.uuid4().hex
        self.celery.send_task(
            ADVANCE_RUN_TASK,
            args=[run_id],
            kwargs={"force": force} if force else {},
            queue=self.settings.aggregation_queue,
            task_id=task_id,
        )
        return task_id
