"""Everything a round task of the training worker needs, built once per process."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from services.training_worker.settings import TrainingWorkerSettings
from shared.db import models as shared_models
from shared.db.base import make_engine, make_session_factory, run_migrations
from shared.readiness import ReadinessProbes
from shared.storage import ObjectStore, open_object_store
from shared.tasks import create_celery_app

SERVICE = "training-worker"
TRAIN_ROUND_TASK = "training.train_round"


def site_queue(site: str) -> str:
    return f"training.{site}"


@dataclass
class TrainingWorkerContext(ReadinessProbes):
    settings: TrainingWorkerSettings

    @property
    def queue(self) -> str:
        return site_queue(self.settings.site)

    @cached_property
    def session_factory(self) -> sessionmaker[Session]:
        return make_session_factory(make_engine(self.settings.database_url))

    @cached_property
    def store(self) -> ObjectStore:
        return open_object_store(self.settings.storage_url)

    @cached_property
    def celery(self) -> Celery:
        app = create_celery_app(SERVICE, self.settings.broker_url, self.settings.database_url)
        app.conf.task_default_queue = self.queue
        app.conf.broker_transport_options = {"visibility_timeout": self.settings.visibility_timeout_seconds}
        return app

    def migrate(self) -> None:
        """Shared tables only (dead letters, audit, tokens): the worker keeps its state in object storage."""
        run_migrations(self.settings.database_url, shared_models.MIGRATIONS, shared_models.VERSION_TABLE)
