"""The base of every service context (``services/<name>/context.py``): the connections all services share,
their migrations, and the ``/readyz`` probes over them.

A context is built once per process (API or worker) and everything in it is lazy, so a process only
connects to what it uses. A service's context subclasses this as a dataclass holding its settings, adds
its ``celery`` app (queues differ per service) and its own parts, and names its models module in
``service_models`` when it owns tables. ``main.py`` hands it to :func:`shared.service_app.build_service_app`
(probes, dead letters, migrations on startup), ``worker.py`` to :class:`shared.worker.ServiceWorker`.
"""

from __future__ import annotations

from functools import cached_property
from types import ModuleType
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from shared.db import models as shared_models
from shared.db.base import make_engine, make_session_factory, run_migrations
from shared.settings import VoxelflowSettings
from shared.storage import ObjectStore, open_object_store

if TYPE_CHECKING:
    from celery import Celery


class ServiceContext:
    settings: VoxelflowSettings
    #: the service's own tables (a module with ``MIGRATIONS`` and ``VERSION_TABLE``); None: shared tables only.
    #: A plain class attribute (the base is no dataclass), so subclasses set it without making it a field.
    service_models: ModuleType | None = None

    if TYPE_CHECKING:

        @property
        def celery(self) -> Celery: ...

    @cached_property
    def engine(self) -> Any:
        return make_engine(self.settings.database_url)

    @cached_property
    def session_factory(self) -> sessionmaker[Session]:
        return make_session_factory(self.engine)

    @cached_property
    def store(self) -> ObjectStore:
        return open_object_store(self.settings.storage_url)

    def migrate(self) -> None:
        """The shared tables (API tokens, audit, dead letters), then the service's own; idempotent."""
        run_migrations(self.settings.database_url, shared_models.MIGRATIONS, shared_models.VERSION_TABLE)
        if self.service_models is not None:
            run_migrations(
                self.settings.database_url, self.service_models.MIGRATIONS, self.service_models.VERSION_TABLE
            )

    def check_database(self) -> None:
        with self.session_factory() as session:
            session.execute(text("SELECT 1"))

    def check_storage(self) -> None:
        self.store.exists("readyz-probe")

    def check_broker(self) -> None:
        with self.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
