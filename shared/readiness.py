"""The ``/readyz`` probes every service context shares: its database, its object store, its broker.

A service context (``services/<name>/context.py``) mixes this in and provides ``session_factory``,
``store`` and ``celery`` (usually as cached properties); ``main.py`` passes the probes it needs to
:func:`shared.http.create_service_app`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import text

if TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy.orm import Session, sessionmaker

    from shared.storage import ObjectStore


class ReadinessProbes:
    if TYPE_CHECKING:

        @property
        def session_factory(self) -> sessionmaker[Session]: ...

        @property
        def store(self) -> ObjectStore: ...

        @property
        def celery(self) -> Celery: ...

    def check_database(self) -> None:
        with self.session_factory() as session:
            session.execute(text("SELECT 1"))

    def check_storage(self) -> None:
        self.store.exists("readyz-probe")

    def check_broker(self) -> None:
        with self.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
