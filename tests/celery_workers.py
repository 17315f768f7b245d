"""A real ``celery worker`` process for tests, as the services run it in production (``-P solo``).

In-process workers (``celery.contrib.testing.worker.start_worker``) share Celery's module-level worker state:
two of them in one pytest process (say the ingest and the preprocessing worker of an end-to-end test) can
hang each other's shutdown. A subprocess has none of that, and it can be SIGKILLed like a real pod.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shared.stack.manager import celery_worker_argv

REPO = Path(__file__).resolve().parents[1]


class CeleryWorkerProcess:
    """``celery -A <app> worker -Q <queue> -P solo`` in its own process group (SIGKILL takes exactly it)."""

    def __init__(self, app: str, queue: str, env: dict[str, str], log_path: Path) -> None:
        self.app, self.queue, self.log_path = app, queue, log_path
        self.env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: float = 60.0) -> None:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        command = celery_worker_argv(self.app, self.queue, "--without-gossip", "--without-mingle")
        self.proc = subprocess.Popen(
            command, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + wait_ready
        while wait_ready and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"celery worker {self.app} exited at start:\n{self.log()}")
            if b" ready." in self.log_path.read_bytes()[offset:]:
                return
            time.sleep(0.2)
        if wait_ready:
            raise RuntimeError(f"celery worker {self.app} not ready after {wait_ready:.0f} s:\n{self.log()}")

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@contextlib.contextmanager
def in_process_worker(app: Any, **kwargs: Any) -> Iterator[Any]:
    """``celery.contrib.testing.worker.start_worker`` for tests that must share the worker's process (they read
    its Prometheus registry, or steer a stand-in worker through module state).

    A worker thread that does not stop within ``shutdown_timeout`` is reported as a warning instead of failing
    the session's teardown: Celery's test workers share module-level state, and with two in one process the
    second can keep the first from noticing the stop. The thread is a daemon and ends with the process.
    """
    from celery.contrib.testing.worker import start_worker

    context = start_worker(app, **kwargs)
    worker = context.__enter__()
    try:
        yield worker
    finally:
        try:
            context.__exit__(None, None, None)
        except RuntimeError as exc:
            if "failed to exit" not in str(exc):
                raise
            warnings.warn(f"in-process Celery worker for {app.main!r} did not stop in time: {exc}", stacklevel=2)
