"""Everything a request handler or task of the preprocessing service needs, built once per process."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from services.preprocessing import models
from services.preprocessing.settings import PreprocessingSettings
from shared.db import models as shared_models
from shared.db.base import make_engine, make_session_factory, run_migrations
from shared.readiness import ReadinessProbes
from shared.storage import ObjectStore, open_object_store
from shared.tasks import create_celery_app

SERVICE = "preprocessing"
SERIES_READY_TASK = "preprocessing.series_ready"
BUILD_DATASET_TASK = "preprocessing.build_dataset"
PRECOMPUTE_TASK = "preprocessing.precompute"


@dataclass
class PreprocessingContext(ReadinessProbes):
    settings: PreprocessingSettings

    @cached_property
    def session_factory(self) -> sessionmaker[Session]:
        return make_session_factory(make_engine(self.settings.database_url))

    @cached_property
    def store(self) -> ObjectStore:
        return open_object_store(self.settings.storage_url)

    @cached_property
    def celery(self) -> Celery:
        app = create_celery_app(SERVICE, self.settings.broker_url, self.settings.database_url)
        app.conf.task_default_queue = self.settings.preprocessing_queue
        return app

    def send(self, task: str, args: list[object], task_id: str | None = None) -> str:
        result = self.celery.send_task(task, args=args, queue=self.settings.preprocessing_queue, task_id=task_id)
        return str(result.id)

    def migrate(self) -> None:
        run_migrations(self.settings.database_url, shared_models.MIGRATIONS, shared_models.VERSION_TABLE)
        run_migrations(self.settings.database_url, models.MIGRATIONS, models.VERSION_TABLE)
