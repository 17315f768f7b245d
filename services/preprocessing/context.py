"""Everything a request handler or task of the preprocessing service needs, built once per process."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from celery import Celery

from services.preprocessing import models
from services.preprocessing.settings import PreprocessingSettings
from shared.service_context import ServiceContext
from shared.tasks import create_celery_app

SERVICE = "preprocessing"


@dataclass
class PreprocessingContext(ServiceContext):
    settings: PreprocessingSettings
    service_models = models

    @cached_property
    def celery(self) -> Celery:
        app = create_celery_app(SERVICE, self.settings.broker_url, self.settings.database_url)
        app.conf.task_default_queue = self.settings.preprocessing_queue
        return app

    def send(self, task: str, args: list[object], task_id: str | None = None) -> str:
        result = self.celery.send_task(task, args=args, queue=self.settings.preprocessing_queue, task_id=task_id)
        return str(result.id)
