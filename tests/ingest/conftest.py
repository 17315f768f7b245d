"""Fixtures of the ingest tests: a running ingest API and worker on the session's real servers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.service_harness import free_port, patched_environ, serving, tokens_for_every_role

ROUTING_TEST_QUEUE = "routing-tests"


@dataclass
class IngestService:
    url: str
    tokens: dict[str, str]  # role -> bearer token
    ctx: object  # services.ingest.context.IngestContext

    def client(self, role: str = "pacs", **kwargs: object) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def ingest_env(
    postgres_url: str, s3_url: str, redis_url: str, orthanc, silent_peer: int, tmp_path_factory
) -> Iterator[dict[str, str]]:
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
        # routing offers go to a queue of their own: only the routing end-to-end test consumes it (on "inference"
        # they would pile up behind the inference tests' job-queue bound)
        "VOXELFLOW_ROUTING_QUEUE": ROUTING_TEST_QUEUE,
        "VOXELFLOW_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "VOXELFLOW_LOG_JSON": "false",
        "VOXELFLOW_API_MAX_REQUEST_BYTES": str(64 * 1024**2),
        # the port Orthanc knows voxelflow's receiver by: a C-MOVE from Orthanc lands there
        "VOXELFLOW_DIMSE_PORT": str(orthanc.receiver_port),
        "VOXELFLOW_PACS": json.dumps(
            {
                "orthanc": {"url": f"{orthanc.url}/dicom-web"},
                "orthanc-dimse": {"url": f"dimse://{orthanc.aet}@{orthanc.host}:{orthanc.dicom_port}"},
                "orthanc-dimse-get": {
                    "url": f"dimse://{orthanc.aet}@{orthanc.host}:{orthanc.dicom_port}",
                    "retrieve": "get",
                },
                # answers nothing: only a time limit ends a pull from it
                "silent": {"url": f"dimse://SILENT@127.0.0.1:{silent_peer}", "timeout_seconds": 600},
            }
        ),
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


@pytest.fixture(scope="session")
def pacs_receiver(ingest_service: IngestService, orthanc) -> Iterator[int]:
    """voxelflow's C-STORE receiver on the port Orthanc knows it by: where a C-MOVE from Orthanc lands."""
    from services.ingest.dimse import start_receiver

    server = start_receiver(ingest_service.ctx, port=orthanc.receiver_port)  # type: ignore[arg-type]
    yield orthanc.receiver_port
    server.shutdown()


@dataclass(frozen=True)
class PacsStudy:
    """A study put into Orthanc under fresh UIDs, so that what a pull stores is new to the catalogue."""

    patient_id: str
    study_uid: str
    series: dict[str, list[str]]  # SeriesInstanceUID -> SOPInstanceUIDs (originals, as in the PACS)
    files: dict[str, bytes]  # SOPInstanceUID -> the file as uploaded


def upload_fresh_study(orthanc, folders: list[list[Path]], tag: str, extra: list[bytes] | None = None) -> PacsStudy:
    """Copy real series (one list of files each) into Orthanc under new Study/Series/SOP UIDs and a new
    PatientID; ``extra`` datasets (already encoded) join the first series under its UIDs."""
    import io

    import pydicom
    from pydicom.uid import generate_uid

    patient_id, study_uid = f"VF-PULL-{tag}", generate_uid()
    series: dict[str, list[str]] = {}
    files: dict[str, bytes] = {}

    def put(dataset: pydicom.Dataset, series_uid: str) -> None:
        dataset.PatientID, dataset.StudyInstanceUID, dataset.SeriesInstanceUID = patient_id, study_uid, series_uid
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        files[str(dataset.SOPInstanceUID)] = buffer.getvalue()
        series.setdefault(series_uid, []).append(str(dataset.SOPInstanceUID))

    for index, paths in enumerate(folders):
        series_uid = generate_uid()
        for path in paths:
            put(pydicom.dcmread(path), series_uid)
        if index == 0:
            for data in extra or []:
                put(pydicom.dcmread(io.BytesIO(data)), series_uid)
    with httpx.Client(base_url=orthanc.url, timeout=60) as pacs:
        for data in files.values():
            response = pacs.post("/instances", content=data)
            assert response.status_code == 200, response.text
    return PacsStudy(patient_id, study_uid, series, files)
