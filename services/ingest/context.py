"""Everything a request handler or task of the ingest service needs, built once per process."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from services.ingest import models
from services.ingest.deidentify import Deidentifier
from services.ingest.receiver import InstanceReceiver
from services.ingest.settings import IngestSettings
from shared.db import models as shared_models
from shared.db.base import make_engine, make_session_factory, run_migrations
from shared.readiness import ReadinessProbes
from shared.storage import ObjectStore, open_object_store
from shared.tasks import create_celery_app

SERVICE = "ingest"
FINALIZE_SERIES_TASK = "ingest.finalize_series"
PULL_FROM_PACS_TASK = "ingest.pull_from_pacs"
SERIES_READY_TASK = "preprocessing.series_ready"


@dataclass
class IngestContext(ReadinessProbes):
    settings: IngestSettings

    @cached_property
    def session_factory(self) -> sessionmaker[Session]:
        return make_session_factory(make_engine(self.settings.database_url))

    @cached_property
    def store(self) -> ObjectStore:
        return open_object_store(self.settings.storage_url)

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
            queue=SERVICE,
        )

    def migrate(self) -> None:
        run_migrations(self.settings.database_url, shared_models.MIGRATIONS, shared_models.VERSION_TABLE)
        run_migrations(self.settings.database_url, models.MIGRATIONS, models.VERSION_TABLE)
