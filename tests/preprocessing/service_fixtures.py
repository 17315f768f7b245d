"""Fixtures for the preprocessing service tests: the API (uvicorn thread) and a real Celery worker on the
session's real PostgreSQL, Redis and S3 (SeaweedFS). Imported by tests/preprocessing/test_service_*.py."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.service_harness import patched_environ, serving, tokens_for_every_role


@dataclass
class PreprocessingService:
    url: str
    tokens: dict[str, str]
    ctx: object  # services.preprocessing.context.PreprocessingContext

    def client(self, role: str = "researcher") -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)


@pytest.fixture(scope="session")
def preprocessing_env(postgres_url: str, s3_url: str, redis_url: str) -> Iterator[dict[str, str]]:
    env = {
        "VOXELFLOW_DATABASE_URL": postgres_url,
        "VOXELFLOW_STORAGE_URL": s3_url,
        "VOXELFLOW_BROKER_URL": redis_url,
        "VOXELFLOW_LOG_JSON": "false",
    }
    with patched_environ(env):
        yield env


@pytest.fixture(scope="session")
def preprocessing_service(preprocessing_env: dict[str, str]) -> Iterator[PreprocessingService]:
    from services.preprocessing.main import create_app
    from services.preprocessing.settings import PreprocessingSettings

    app = create_app(PreprocessingSettings())
    with serving(app, "preprocessing") as url:
        yield PreprocessingService(url, tokens_for_every_role(app.state.ctx.session_factory, "pp-test"), app.state.ctx)


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
