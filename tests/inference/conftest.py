"""Fixtures of the inference service tests: a running inference API on the session's real servers.

``running_service(settings, source)``: with ``source=None`` the service builds its own
``RegistryModelSource`` (real MLflow registry, exports on ONNX Runtime or Triton; test_service_registry.py).
The API, job, PACS and back-pressure tests pass the test-only source of :mod:`tests.inference.served_models`
(a tiny PyTorch UNet whose load and predict delays a test controls); everything else (PostgreSQL, Redis,
S3, Orthanc, HTTP) is real either way.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from shared.data import shared_data_dir

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    found = shared_data_dir()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("shared data not found: set VOXELFLOW_SHARED_DATA or provide <repo>/../shared/data")
        pytest.skip("shared real-data folder not found: set VOXELFLOW_SHARED_DATA")
    return found


@pytest.fixture(scope="session")
def hippocampus_nifti(shared_data: Path) -> bytes:
    images = sorted((shared_data / "msd_task04_hippocampus" / "imagesTr").glob("*.nii.gz"))
    return images[0].read_bytes()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class InferenceService:
    url: str
    tokens: dict[str, str]
    app: Any
    ctx: Any  # services.inference.context.InferenceContext

    def client(self, role: str | None = "researcher", **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}
        headers.update(kwargs.pop("headers", {}))
        return httpx.Client(base_url=self.url, headers=headers, timeout=120, **kwargs)


@pytest.fixture(scope="session")
def base_settings(postgres_url: str, redis_url: str, s3_url: str) -> dict[str, Any]:
    return {
        "database_url": postgres_url,
        "broker_url": redis_url,
        "storage_url": s3_url,
        "log_json": False,
        "api_max_request_bytes": 32 * 1024**2,
        "alias_poll_seconds": 3600,  # tests move aliases and call poll_once() themselves
    }


@contextmanager
def running_service(settings: dict[str, Any], source: Any) -> Iterator[InferenceService]:
    import uvicorn

    from services.inference.main import create_app
    from services.inference.settings import InferenceSettings
    from shared.auth import Role, create_token
    from shared.db.base import session_scope

    app = create_app(InferenceSettings(**settings), model_source=source)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("inference API did not start")
        time.sleep(0.05)
    ctx = app.state.ctx
    tokens = {}
    with session_scope(ctx.session_factory) as session:
        for role in Role:
            tokens[role.value] = create_token(session, f"test-inference-{role.value}-{port}", role)
    try:
        yield InferenceService(f"http://127.0.0.1:{port}", tokens, app, ctx)
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")
