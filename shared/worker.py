"""The Celery entry point of every service, built lazily: ``celery -A services.<name>.worker worker``.

Why lazy: importing ``services.<name>.worker`` used to read the settings, configure logging, start a
metrics server, run migrations and register the tasks, so a test, a linter or ``celery inspect`` that merely
imported it opened sockets and touched the database. Now a service's ``worker.py`` is::

    worker = ServiceWorker("ingest-worker", lambda: IngestContext(IngestSettings()), ["services.ingest.tasks"])
    worker_context = worker.context
    __getattr__ = worker.module_getattr

Nothing happens at import. The first access to ``celery_app`` (or ``app``, which is what Celery's
``find_app`` asks a module for) builds the context, configures logging, applies the task time limits of the
settings and imports the task modules; what only a running worker needs (metrics server, migrations,
``setup`` such as torch threads) runs in Celery's ``worker_init`` signal, and ``on_ready`` in ``worker_ready``.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from celery import Celery, signals

from shared.observability.logging import configure_logging
from shared.service_context import ServiceContext

C = TypeVar("C", bound=ServiceContext)

#: module attributes that name the Celery app (Celery's find_app asks for ``app``, then ``celery``)
APP_NAMES = ("celery_app", "app", "celery")


class ServiceWorker(Generic[C]):
    def __init__(
        self,
        log_name: str | Callable[[C], str],
        context_factory: Callable[[], C],
        task_modules: Sequence[str],
        *,
        migrate: bool = True,
        setup: Callable[[C], None] | None = None,
        on_ready: Callable[[C], None] | None = None,
    ) -> None:
        self._log_name = log_name
        self._context_factory = context_factory
        self._task_modules = tuple(task_modules)
        self._migrate = migrate
        self._setup = setup
        self._on_ready = on_ready
        self._context: C | None = None
        self._app: Celery | None = None
        self._lock = threading.RLock()

    def context(self) -> C:
        """This process's context (built on first use, then shared by every task)."""
        with self._lock:
            if self._context is None:
                self._context = self._context_factory()
            return self._context

    def use_context(self, ctx: C) -> None:
        """Run this process's tasks on an existing context (an API process that also consumes jobs; tests)."""
        with self._lock:
            self._context = ctx

    def celery_app(self) -> Celery:
        with self._lock:
            if self._app is None:
                ctx = self.context()
                settings = ctx.settings
                name = self._log_name(ctx) if callable(self._log_name) else self._log_name
                configure_logging(name, settings.log_level, settings.log_json)
                app = ctx.celery
                apply_time_limit_overrides(app, settings.task_time_limits)
                for module in self._task_modules:
                    importlib.import_module(module)  # registers the module's shared tasks
                app.finalize()
                self._connect_signals(app)
                self._app = app
            return self._app

    def module_getattr(self, name: str) -> Any:
        """A worker module's ``__getattr__``: ``celery_app``/``app``/``celery`` build the app on first access."""
        if name in APP_NAMES:
            return self.celery_app()
        raise AttributeError(name)

    def _connect_signals(self, app: Celery) -> None:
        def ours(sender: Any) -> bool:  # another Celery app's worker in the same process is not ours
            return sender is None or getattr(sender, "app", app) is app

        def on_init(sender: Any = None, **_: Any) -> None:
            if ours(sender):
                self.start_worker_process()

        def on_ready(sender: Any = None, **_: Any) -> None:
            if ours(sender) and self._on_ready is not None:
                self._on_ready(self.context())

        # strong references: the receivers are closures that would otherwise be collected at once
        signals.worker_init.connect(on_init, weak=False)
        signals.worker_ready.connect(on_ready, weak=False)

    def start_worker_process(self) -> None:
        """What a running worker needs and an importer does not: setup, migrations, the metrics server."""
        ctx = self.context()
        if self._setup is not None:
            self._setup(ctx)
        if self._migrate:
            ctx.migrate()  # a worker may start before the API created the tables; dead letters need them
        if ctx.settings.metrics_port:
            from prometheus_client import start_http_server

            start_http_server(ctx.settings.metrics_port)


def apply_time_limit_overrides(app: Celery, overrides: dict[str, tuple[float, float]]) -> None:
    """``{task name: (soft, hard)}`` from the settings replaces the task's own limits (Celery annotations)."""
    if overrides:
        app.conf.task_annotations = {
            name: {"soft_time_limit": float(soft), "time_limit": float(hard)}
            for name, (soft, hard) in overrides.items()
        }
