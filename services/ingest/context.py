"""Everything a request handler or task of the ingest service needs, built once per process."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from celery import Celery

from services.ingest import models
from services.ingest.deidentify import Deidentifier
from services.ingest.receiver import InstanceReceiver
from services.ingest.settings import IngestSettings
from shared.contracts.tasks import FINALIZE_SERIES_TASK, INGEST_QUEUE
from shared.service_context import ServiceContext
from shared.tasks import create_celery_app

SERVICE = "ingest"


@dataclass
class IngestContext(ServiceContext):
    settings: IngestSettings
    service_models = models

    @cached_property
    def celery(self) -> Celery:
        return create_celery_app(SERVICE, self.settings.broker_url, self.settings.database_url)

    @cached_property
    def deidentifier(self) -> Deidentifier:
        return Deidentifier(self.settings.resolved_deid_key(), self.settings.project)

    @cached_property
    def receiver(self) -> InstanceReceiver:
        return InstanceReceiver(
            self.session_factory,
            self.store,
            self.deidentifier,
            self.settings.site,
            self.settings.max_instance_bytes,
            on_series_receiving=self.schedule_series_check,
        )

    def schedule_series_check(self, series_uid: str, delay: float | None = None) -> None:
        """Ask a worker to finalise the series once it has been quiet for the stable age."""
        self.celery.send_task(
            FINALIZE_SERIES_TASK,
            args=[series_uid],
            countdown=self.settings.series_stable_seconds if delay is None else delay,
            queue=INGEST_QUEUE,
        )
