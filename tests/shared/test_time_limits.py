"""Task time limits hold in the solo pool the workers run (Celery itself enforces them only under prefork):
a real ``celery worker -P solo`` process on the session's Redis, its dead letters in the real PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery.exceptions import TimeLimitExceeded
from sqlalchemy import select

from shared.db import models
from shared.db.base import make_engine, make_session_factory, run_migrations, session_scope
from shared.db.models import DeadLetter
from tests.celery_workers import CeleryWorkerProcess
from tests.service_harness import patched_environ, wait_for


@pytest.fixture(scope="module")
def worker(redis_url: str, postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    run_migrations(postgres_url, models.MIGRATIONS, models.VERSION_TABLE)
    env = {"VOXELFLOW_BROKER_URL": redis_url, "VOXELFLOW_DATABASE_URL": postgres_url}
    with patched_environ(env):
        from tests.shared import time_limit_app

        process = CeleryWorkerProcess(
            "tests.shared.time_limit_app",
            time_limit_app.QUEUE,
            env,
            Path(tmp_path_factory.mktemp("time-limits")) / "worker.log",
        )
        process.start()
        yield time_limit_app
        process.stop()


def test_the_soft_limit_lets_a_task_stop_cleanly(worker: object) -> None:
    app = worker.app  # type: ignore[attr-defined]
    started = time.monotonic()
    result = app.send_task("test.overstay", args=[30, False], queue=worker.QUEUE)  # type: ignore[attr-defined]
    assert result.get(timeout=25) == "stopped at the soft limit"
    assert time.monotonic() - started < 25  # not the 30 s the task asked for


def test_the_hard_limit_ends_a_task_that_ignores_the_soft_one(worker: object, postgres_url: str) -> None:
    app = worker.app  # type: ignore[attr-defined]
    result = app.send_task("test.overstay", args=[30, True], queue=worker.QUEUE)  # type: ignore[attr-defined]
    with pytest.raises(TimeLimitExceeded, match="hard time limit of 3 s"):
        result.get(timeout=25, propagate=True)
    factory = make_session_factory(make_engine(postgres_url))

    def dead_letter() -> DeadLetter | None:
        with session_scope(factory) as session:
            row = session.scalar(select(DeadLetter).where(DeadLetter.task_id == result.id))
            if row is not None:
                session.expunge(row)
            return row

    letter = wait_for(dead_letter, timeout=20, what="the dead letter of the task that overstayed")
    assert letter.exception_type == "TimeLimitExceeded" and letter.task_name == "test.overstay"
