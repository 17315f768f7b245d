"""The one way a service wires its HTTP app: ``main.py`` is a call to :func:`build_service_app`.

Why: the six ``main.py`` bodies were the same dozen lines (logging, context, probes, dead letters, queue
gauge, migrations on startup, ``app.state.ctx``, a module ``__getattr__`` for uvicorn) with small
differences nobody meant. A service now states only what differs: its title, routers, extra probes and
lifecycle steps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI

from shared.http import ReadinessCheck, create_service_app
from shared.observability.logging import configure_logging
from shared.service_context import ServiceContext
from shared.tasks import dead_letter_router, register_queue_length_collector


def default_readiness_checks(ctx: ServiceContext) -> dict[str, ReadinessCheck]:
    """Database, object storage and broker: what every Celery-backed service depends on."""
    return {"database": ctx.check_database, "object_storage": ctx.check_storage, "broker": ctx.check_broker}


def build_service_app(
    ctx: ServiceContext,
    *,
    service: str,
    title: str,
    description: str,
    routers: Sequence[APIRouter] = (),
    readiness_checks: Mapping[str, ReadinessCheck] | None = None,
    extra_readiness_checks: Mapping[str, ReadinessCheck] | None = None,
    dead_letters: bool = True,
    queues: Sequence[str] = (),
    startup: Sequence[Callable[[], None]] = (),
    shutdown: Sequence[Callable[[], None]] = (),
    version: str = "0.1.0",
) -> FastAPI:
    """The service's FastAPI app around ``ctx`` (kept in ``app.state.ctx`` for :mod:`shared.deps`).

    ``readiness_checks`` default to :func:`default_readiness_checks`, plus ``extra_readiness_checks``;
    ``dead_letters`` adds ``/dead-letters`` over the service's Celery app; ``queues`` get a length gauge;
    migrations run first on startup, then ``startup``.
    """
    settings = ctx.settings
    configure_logging(service, settings.log_level, settings.log_json)
    checks = dict(default_readiness_checks(ctx) if readiness_checks is None else readiness_checks)
    checks.update(extra_readiness_checks or {})
    all_routers = list(routers)
    if dead_letters:
        all_routers.append(dead_letter_router(service, ctx.celery, ctx.session_factory))
    app = create_service_app(
        service=service,
        title=title,
        description=description,
        version=version,
        session_factory=ctx.session_factory,
        max_request_bytes=settings.api_max_request_bytes,
        body_timeout_seconds=settings.api_body_timeout_seconds,
        project=settings.project,
        public_api_docs=settings.public_api_docs,
        routers=all_routers,
        readiness_checks=checks,
        startup=[ctx.migrate, *startup],
        shutdown=shutdown,
    )
    app.state.ctx = ctx
    if queues:
        register_queue_length_collector(settings.broker_url, list(queues))
    return app


def lazy_app(create_app: Callable[[], FastAPI]) -> Callable[[str], Any]:
    """A ``main.py`` module ``__getattr__``: ``services.<name>.main:app`` builds the app once, on first access.

    Importing ``main`` therefore reads no settings; uvicorn's ``module:app`` lookup builds it.
    """
    built: list[FastAPI] = []

    def module_getattr(name: str) -> Any:
        if name == "app":
            if not built:
                built.append(create_app())
            return built[0]
        raise AttributeError(name)

    return module_getattr
