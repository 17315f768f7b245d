"""Fixtures of the inference service tests: a running inference API on the session's real servers.

``running_service(settings, source)``: with ``source=None`` the service builds its own
``RegistryModelSource`` (real MLflow registry, exports on ONNX Runtime or Triton; test_service_registry.py).
The API, job, PACS and back-pressure tests pass the test-only source of :mod:`tests.inference.served_models`
(a tiny PyTorch UNet whose load and predict delays a test controls); everything else (PostgreSQL, Redis,
S3, Orthanc, HTTP) is real either way.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
import torch

from tests.service_harness import serving, tokens_for_every_role

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def hippocampus_nifti(shared_data: Path) -> bytes:
    images = sorted((shared_data / "msd_task04_hippocampus" / "imagesTr").glob("*.nii.gz"))
    return images[0].read_bytes()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


HIPPO_CROP = "tcia_brain_tumor_progression_mr/Study1/13_HCropVolume"


@pytest.fixture(scope="module")
def pacs_series(orthanc: Any, shared_data: Path) -> dict[str, Any]:
    """The TCIA HippoCrop series, stored in Orthanc through its REST API."""
    files = sorted((shared_data / HIPPO_CROP).glob("*.dcm"))
    for path in files:
        response = httpx.post(f"{orthanc.url}/instances", content=path.read_bytes(), timeout=30)
        assert response.status_code == 200, response.text
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    positions = {
        str(ds.SOPInstanceUID): [float(v) for v in ds.ImagePositionPatient]
        for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in files)
    }
    return {
        "study": str(first.StudyInstanceUID),
        "series": str(first.SeriesInstanceUID),
        "positions": positions,
        "root": f"{orthanc.url}/dicom-web",
    }


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
        "deid_key": "inference-test-pseudonym-key-0123456789",  # never the developer's .voxelflow/deid.key
    }


@contextmanager
def running_service(settings: dict[str, Any], source: Any) -> Iterator[InferenceService]:
    from services.inference.main import create_app
    from services.inference.settings import InferenceSettings

    app = create_app(InferenceSettings(**settings), model_source=source)
    with serving(app, "inference") as url:
        tokens = tokens_for_every_role(app.state.ctx.session_factory, "test-inference")
        yield InferenceService(url, tokens, app, app.state.ctx)
