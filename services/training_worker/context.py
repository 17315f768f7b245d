"""Everything a round task of the training worker needs, built once per process."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from celery import Celery

from services.training_worker.settings import TrainingWorkerSettings
from shared.contracts.progress import ProgressPublisher
from shared.contracts.tasks import training_queue
from shared.service_context import ServiceContext
from shared.tasks import create_celery_app

SERVICE = "training-worker"


@dataclass
class TrainingWorkerContext(ServiceContext):
    settings: TrainingWorkerSettings

    @property
    def queue(self) -> str:
        return training_queue(self.settings.site, self.settings.training_queue_prefix)

    @cached_property
    def celery(self) -> Celery:
        app = create_celery_app(SERVICE, self.settings.broker_url, self.settings.database_url)
        app.conf.task_default_queue = self.queue
        app.conf.broker_transport_options = {"visibility_timeout": self.settings.visibility_timeout_seconds}
        return app

    @cached_property
    def progress(self) -> ProgressPublisher:
        """Per-epoch progress for the run's event stream (read by the aggregation API, shared.contracts.progress)."""
        return ProgressPublisher(self.settings.broker_url)
