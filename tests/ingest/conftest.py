"""Fixtures of the ingest tests: a running ingest API and worker on the session's real servers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.service_harness import free_port, patched_environ, serving, tokens_for_every_role


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
    with patched_environ(env):
        yield env


@pytest.fixture(scope="session")
def ingest_service(ingest_env: dict[str, str]) -> Iterator[IngestService]:
    from services.ingest.main import create_app
    from services.ingest.settings import IngestSettings

    app = create_app(IngestSettings())
    with serving(app, "ingest", port=int(ingest_env["INGEST_TEST_PORT"])) as url:
        yield IngestService(url, tokens_for_every_role(app.state.ctx.session_factory, "test"), app.state.ctx)


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
