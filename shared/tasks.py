"""Celery for every service: one queue per service, late acks, retries with backoff, dead letters.

Why these settings: tasks here are long (volume reconstruction, training rounds) and must survive a
killed worker, so messages are acknowledged only after the task finishes (``acks_late``) and requeued
when the worker dies (``reject_on_worker_lost``); prefetch 1 keeps one long task from blocking others
behind it. Every task must therefore be idempotent. A task that exhausts its retries, or fails with a
:class:`PermanentTaskError`, is kept as a :class:`~shared.db.models.DeadLetter` row with its arguments
and reason, listable and retryable through ``/dead-letters``.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

from celery import Celery, Task, signals
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from fastapi import APIRouter, Depends, HTTPException
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector
from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from shared.auth import Principal, Role, role_checker
from shared.db.base import make_engine, make_session_factory, session_scope, utcnow
from shared.db.models import DeadLetter
from shared.observability import metrics
from shared.validation import DatabaseId

log = logging.getLogger("voxelflow.tasks")


class PermanentTaskError(Exception):
    """Retrying cannot help (bad input, unknown ID): fail now, keep a dead letter with this reason."""


RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, OSError)


class VoxelflowTask(Task):
    autoretry_for = RETRYABLE_ERRORS
    retry_backoff = 2
    retry_backoff_max = 300
    retry_jitter = True
    max_retries = 5
    acks_late = True
    reject_on_worker_lost = True

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        record_dead_letter(self.app, self, exc, task_id, args, kwargs)


def record_dead_letter(app: Celery, task: Task, exc: BaseException, task_id: str, args: Any, kwargs: Any) -> None:
    factory = session_factory_for(app)
    try:
        with session_scope(factory) as session:
            if session.scalar(select(DeadLetter).where(DeadLetter.task_id == task_id)) is not None:
                return  # the same failure reported twice (redelivery) is one dead letter
            delivery = task.request.delivery_info or {}
            session.add(
                DeadLetter(
                    service=app.conf.voxelflow_service,
                    task_id=task_id,
                    task_name=task.name,
                    queue=delivery.get("routing_key") or app.conf.task_default_queue,
                    args=list(args or []),
                    kwargs=dict(kwargs or {}),
                    exception_type=type(exc).__name__,
                    exception_message=str(exc)[:10000],
                    traceback="".join(traceback.format_exception(exc))[-20000:],
                    retries=task.request.retries or 0,
                )
            )
    except Exception:
        log.exception("could not record dead letter for task %s", task_id)


_session_factories: dict[str, sessionmaker[Session]] = {}


def session_factory_for(app: Celery) -> sessionmaker[Session]:
    url = app.conf.voxelflow_database_url
    if url not in _session_factories:
        _session_factories[url] = make_session_factory(make_engine(url))
    return _session_factories[url]


def create_celery_app(service: str, broker_url: str, database_url: str) -> Celery:
    app = Celery(f"voxelflow.{service}", broker=broker_url, backend=broker_url, task_cls=VoxelflowTask)
    app.conf.update(
        voxelflow_service=service,
        voxelflow_database_url=database_url,
        task_default_queue=service,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_track_started=True,
        result_expires=7 * 24 * 3600,
        broker_connection_retry_on_startup=True,
        # A redelivered long task must not be handed to a second worker while the first still runs it.
        broker_transport_options={"visibility_timeout": 6 * 3600},
        worker_send_task_events=True,
    )
    return app


_task_started: dict[str, float] = {}


# ------------------------------------------------------------------ time limits in the solo pool
# Celery enforces soft and hard time limits only in its prefork pool (the pool's supervisor signals the
# child). voxelflow's workers run ``-P solo`` (a task owns the process: torch threads, /metrics), where
# Celery ignores both limits, so a hung task would hold the worker for ever. In the solo pool the task runs
# in the worker's main thread, so an interval timer (SIGALRM) raises SoftTimeLimitExceeded at the soft limit,
# where the task can stop cleanly, and TimeLimitExceeded at the hard limit; the task then fails (or is
# retried by its own handler) like a prefork task whose limit ran out.


def _limits_of(task: Task) -> tuple[float | None, float | None]:
    """(soft, hard) seconds for this execution: the call's own ``timelimit``, else the task's (annotated)."""
    hard, soft = getattr(task.request, "timelimit", None) or (None, None)
    return soft or task.soft_time_limit, hard or task.time_limit


def _runs_in_solo_pool() -> bool:
    """The task runs in the worker's own main thread (solo pool), not in a prefork child (Celery's limits
    apply there) nor in a thread (a signal cannot reach it)."""
    from billiard.process import current_process

    main_thread = threading.current_thread() is threading.main_thread()
    return main_thread and current_process().name == "MainProcess" and hasattr(signal, "setitimer")


def _arm_time_limits(task: Task) -> None:
    soft, hard = _limits_of(task)
    if not (soft or hard) or not _runs_in_solo_pool():
        return
    deadlines = sorted({float(x) for x in (soft, hard) if x})
    started = time.monotonic()

    def expired(signum: int, frame: Any) -> None:
        elapsed = time.monotonic() - started
        if hard and elapsed >= float(hard) - 0.01:
            raise TimeLimitExceeded(f"{task.name} ran past its hard time limit of {hard:g} s")
        if hard:  # the soft limit: warn the task, and arm the hard one
            signal.setitimer(signal.ITIMER_REAL, max(float(hard) - elapsed, 0.01))
        raise SoftTimeLimitExceeded(f"{task.name} ran past its soft time limit of {soft:g} s")

    signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, deadlines[0])


def _disarm_time_limits() -> None:
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        signal.setitimer(signal.ITIMER_REAL, 0)


@signals.task_prerun.connect
def _on_prerun(task_id: str | None = None, task: Task | None = None, **_: Any) -> None:
    if task_id:
        _task_started[task_id] = time.perf_counter()
    if task is not None and not task.request.is_eager:
        _arm_time_limits(task)


@signals.task_postrun.connect
def _on_postrun(task_id: str | None = None, task: Task | None = None, state: str | None = None, **_: Any) -> None:
    _disarm_time_limits()
    if task is None or task_id is None:
        return
    service = task.app.conf.get("voxelflow_service", "unknown")
    started = _task_started.pop(task_id, None)
    if started is not None:
        metrics.celery_task_duration_seconds.labels(service, task.name).observe(time.perf_counter() - started)
    final = {"SUCCESS": "succeeded", "FAILURE": "failed", "RETRY": "retried"}.get(state or "")
    if final:
        metrics.celery_tasks_total.labels(service, task.name, final).inc()


class QueueLengthCollector(Collector):
    """Reads Celery queue lengths from Redis at scrape time (for dashboards, alerts and KEDA)."""

    def __init__(self, broker_url: str, queues: list[str]):
        import redis

        self._redis = redis.Redis.from_url(broker_url, socket_timeout=2)
        self._queues = queues

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            metrics.celery_queue_length._name, metrics.celery_queue_length._documentation, labels=["queue"]
        )
        for queue in self._queues:
            try:
                family.add_metric([queue], float(self._redis.llen(queue)))
            except Exception:  # an unreachable broker shows up in /readyz, not as a failed scrape
                continue
        yield family


_queue_collector: QueueLengthCollector | None = None


def register_queue_length_collector(broker_url: str, queues: list[str]) -> None:
    """Replace the static gauge with a scrape-time reader; calling it again replaces the reader."""
    global _queue_collector
    for previous in (metrics.celery_queue_length, _queue_collector):
        with contextlib.suppress(KeyError):
            if previous is not None:
                REGISTRY.unregister(previous)
    _queue_collector = QueueLengthCollector(broker_url, queues)
    REGISTRY.register(_queue_collector)


class DeadLetterOut(BaseModel):  # type: ignore[no-redef]  # pydantic plugin: field "kwargs" vs __init__(**kwargs)
    id: int
    service: str
    task_id: str
    task_name: str
    queue: str | None
    args: list[Any]
    kwargs: dict[str, Any]
    exception_type: str
    exception_message: str
    retries: int
    failed_at: Any
    requeued_at: Any | None
    requeued_task_id: str | None


def dead_letter_router(service: str, celery_app: Celery, session_factory: sessionmaker[Session]) -> APIRouter:
    router = APIRouter(prefix="/dead-letters", tags=["operations"])
    operator = Depends(role_checker(Role.OPERATOR))

    @router.get("", response_model=list[DeadLetterOut])
    def list_dead_letters(principal: Principal = operator, include_requeued: bool = False) -> list[DeadLetter]:
        with session_scope(session_factory) as session:
            query = select(DeadLetter).where(DeadLetter.service == service).order_by(DeadLetter.id)
            if not include_requeued:
                query = query.where(DeadLetter.requeued_at.is_(None))
            rows = list(session.scalars(query))
            metrics.dead_letters.labels(service).set(
                session.scalar(
                    select(func.count(DeadLetter.id)).where(
                        DeadLetter.service == service, DeadLetter.requeued_at.is_(None)
                    )
                )
                or 0
            )
            return rows

    @router.post(
        "/{id}/retry",
        response_model=DeadLetterOut,
        responses={404: {"description": "no such dead letter"}, 409: {"description": "already requeued"}},
    )
    def retry_dead_letter(id: DatabaseId, principal: Principal = operator) -> DeadLetter:
        with session_scope(session_factory) as session:
            letter = session.get(DeadLetter, id)
            if letter is None or letter.service != service:
                raise HTTPException(404, f"no dead letter {id} in service {service}")
            if letter.requeued_at is not None:
                raise HTTPException(409, f"dead letter {id} was already requeued as task {letter.requeued_task_id}")
            result = celery_app.send_task(letter.task_name, args=letter.args, kwargs=letter.kwargs, queue=letter.queue)
            letter.requeued_at = utcnow()
            letter.requeued_task_id = result.id
            return letter

    return router
