"""Shared fixtures for ingest tests: locate the real data set without copying it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.data import shared_data_dir


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to shared/data; skips (not fails) where the data is not mounted."""
    found = shared_data_dir()
    if found is None:
        if os.environ.get("CI"):  # in CI missing data is a broken setup, not a reason to skip
            pytest.fail("shared data not found: set VOXELFLOW_SHARED_DATA or provide <repo>/../shared/data")
        pytest.skip(
            "shared real-data folder not found: set VOXELFLOW_SHARED_DATA or provide "
            "<repo>/../shared/data or /work/shared/data"
        )
    return found


# --- A running ingest service on the session's real servers -----------------------------------------

import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import httpx  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class IngestService:
    url: str
    tokens: dict[str, str]  # role -> bearer token
    ctx: object  # services.ingest.context.IngestContext

    def client(self, role: str = "pacs", **kwargs: object) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def ingest_env(postgres_url: str, s3_url: str, redis_url: str, orthanc, tmp_path_factory) -> Iterator[dict[str, str]]:
    """Environment of the ingest processes: real PostgreSQL, S3 (SeaweedFS), Redis and Orthanc as the PACS."""
    import json

    port = free_port()
    env = {
        "VOXELFLOW_DATABASE_URL": postgres_url,
        "VOXELFLOW_STORAGE_URL": s3_url,
        "VOXELFLOW_BROKER_URL": redis_url,
        "VOXELFLOW_DEID_KEY": "test-key-" + "0" * 32,
        "VOXELFLOW_PROJECT": "tests",
        "VOXELFLOW_SITE": "test-site",
        "VOXELFLOW_SERIES_STABLE_SECONDS": "1",
        "VOXELFLOW_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "VOXELFLOW_LOG_JSON": "false",
        "VOXELFLOW_API_MAX_REQUEST_BYTES": str(64 * 1024**2),
        "VOXELFLOW_DIMSE_PORT": str(free_port()),
        "VOXELFLOW_PACS": json.dumps({"orthanc": {"url": f"{orthanc.url}/dicom-web"}}),
        "INGEST_TEST_PORT": str(port),
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
def ingest_service(ingest_env: dict[str, str]) -> Iterator[IngestService]:
    import uvicorn

    from services.ingest.main import create_app
    from services.ingest.settings import IngestSettings
    from shared.auth import Role, create_token
    from shared.db.base import session_scope

    app = create_app(IngestSettings())
    port = int(ingest_env["INGEST_TEST_PORT"])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("ingest API did not start")
        time.sleep(0.05)
    ctx = app.state.ctx
    tokens = {}
    with session_scope(ctx.session_factory) as session:
        for role in Role:
            tokens[role.value] = create_token(session, f"test-{role.value}-{port}", role)
    yield IngestService(f"http://127.0.0.1:{port}", tokens, ctx)
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="session")
def ingest_worker(
    ingest_service: IngestService, ingest_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[object]:
    """A real Celery worker process consuming the ingest queue from the session's Redis."""
    from tests.celery_workers import CeleryWorkerProcess

    worker = CeleryWorkerProcess(
        "services.ingest.worker", "ingest", ingest_env, tmp_path_factory.mktemp("ingest-worker") / "worker.log"
    )
    worker.start()
    yield worker
    worker.stop()


def multipart_body(files: list[bytes], boundary: str = "vfboundary") -> tuple[bytes, str]:
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n" for data in files
    )
    body += f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def stow(client: httpx.Client, files: list[bytes], study: str | None = None) -> httpx.Response:
    body, content_type = multipart_body(files)
    path = f"/dicomweb/studies/{study}" if study else "/dicomweb/studies"
    return client.post(path, content=body, headers={"Content-Type": content_type})


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.2, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")
