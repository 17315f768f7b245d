"""Fixtures for the preprocessing service tests: the API (uvicorn thread) and a real Celery worker on the
session's real PostgreSQL, Redis and S3 (SeaweedFS). Imported by tests/preprocessing/test_service_*.py."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from shared.data import shared_data_dir


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PreprocessingService:
    url: str
    tokens: dict[str, str]
    ctx: object  # services.preprocessing.context.PreprocessingContext

    def client(self, role: str = "researcher") -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)


@pytest.fixture(scope="session")
def hippocampus_dir() -> Path:
    found = shared_data_dir()
    if found is None or not (found / "msd_task04_hippocampus" / "dataset.json").is_file():
        if os.environ.get("CI"):
            pytest.fail("shared data not found: set VOXELFLOW_SHARED_DATA")
        pytest.skip("msd_task04_hippocampus not found (VOXELFLOW_SHARED_DATA)")
    return found / "msd_task04_hippocampus"


@pytest.fixture(scope="session")
def preprocessing_env(postgres_url: str, s3_url: str, redis_url: str) -> Iterator[dict[str, str]]:
    env = {
        "VOXELFLOW_DATABASE_URL": postgres_url,
        "VOXELFLOW_STORAGE_URL": s3_url,
        "VOXELFLOW_BROKER_URL": redis_url,
        "VOXELFLOW_LOG_JSON": "false",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def preprocessing_service(preprocessing_env: dict[str, str]) -> Iterator[PreprocessingService]:
    import uvicorn

    from services.preprocessing.main import create_app
    from services.preprocessing.settings import PreprocessingSettings
    from shared.auth import Role, create_token
    from shared.db.base import session_scope

    app = create_app(PreprocessingSettings())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("preprocessing API did not start")
        time.sleep(0.05)
    ctx = app.state.ctx
    tokens = {}
    with session_scope(ctx.session_factory) as session:
        for role in Role:
            tokens[role.value] = create_token(session, f"pp-test-{role.value}-{port}", role)
    yield PreprocessingService(f"http://127.0.0.1:{port}", tokens, ctx)
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="session")
def preprocessing_worker(
    preprocessing_service: PreprocessingService,
    preprocessing_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[object]:
    """A real Celery worker process consuming the preprocessing queue from the session's Redis."""
    from tests.celery_workers import CeleryWorkerProcess

    worker = CeleryWorkerProcess(
        "services.preprocessing.worker",
        "preprocessing",
        preprocessing_env,
        tmp_path_factory.mktemp("preprocessing-worker") / "worker.log",
    )
    worker.start()
    yield worker
    worker.stop()


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.2, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")
