"""Ingest paths that involve the Celery worker, Orthanc as the hospital PACS, and DIMSE (dcmtk)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pydicom
import pytest
import redis
from pydicom.uid import generate_uid
from sqlalchemy import select

from services.ingest.models import Instance
from shared.contracts.tasks import SERIES_READY_TASK
from shared.db.models import DeadLetter
from tests.ingest.conftest import IngestService, stow
from tests.service_harness import free_port, wait_for

TCIA = "tcia_brain_tumor_progression_mr"


def with_new_uids(path: Path, series_uid: str) -> bytes:
    dataset = pydicom.dcmread(path)
    dataset.SeriesInstanceUID = series_uid
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def series_status(service: IngestService, series_uid: str) -> dict:
    with service.client("researcher") as client:
        response = client.get(f"/series/{series_uid}")
        return response.json() if response.status_code == 200 else {}


def series_ready_messages(redis_url: str) -> list[dict]:
    """The 'series ready' messages waiting on the preprocessing queue (nobody consumes it here).

    Other tasks may wait on the same queue when the whole suite shares one Redis (a precompute job's ID of the
    preprocessing tests): only ``preprocessing.series_ready`` carries a SeriesIngested message.
    """
    import base64

    client = redis.Redis.from_url(redis_url)
    messages = []
    for raw in client.lrange("preprocessing", 0, -1):
        envelope = json.loads(raw)
        if envelope["headers"]["task"] != SERIES_READY_TASK:
            continue
        body = json.loads(base64.b64decode(envelope["body"]))
        messages.append({"task": envelope["headers"]["task"], "message": body[0][0]})
    return messages


def test_complete_series_is_reconstructed_and_announced(
    ingest_service: IngestService, ingest_worker: object, shared_data: Path, ingest_env: dict[str, str]
):
    folder = shared_data / TCIA / "Study2" / "14_HCropVolume"
    files = sorted(folder.iterdir())
    original = pydicom.dcmread(files[0])
    with ingest_service.client("pacs") as client:
        assert stow(client, [f.read_bytes() for f in files]).status_code == 200
    status = wait_for(
        lambda: (s := series_status(ingest_service, original.SeriesInstanceUID)).get("status") == "volume" and s,
        what="HippoCrop series to be reconstructed",
    )
    volume = status["volumes"][0]
    assert volume["shape"] == [36, 48, 35]  # Columns x Rows x slices, README: 48x36 matrix, 35 files
    assert volume["spacing_mm"] == pytest.approx([1.0, 1.0, 1.0])
    nifti = ingest_service.ctx.store.get_bytes(volume["key"])  # type: ignore[attr-defined]
    assert nifti[:2] == b"\x1f\x8b"  # gzip
    messages = wait_for(
        lambda: [
            m
            for m in series_ready_messages(ingest_env["VOXELFLOW_BROKER_URL"])
            if m["message"]["series_instance_uid"] == status["series_instance_uid"]
        ],
        what="series ready message",
    )
    assert len(messages) == 1 and messages[0]["task"] == "preprocessing.series_ready"
    message = messages[0]["message"]
    assert message["volume_uri"] == volume["key"] and message["instance_count"] == 35
    assert message["patient_pseudonym"].startswith("VF-") and "PGBM" not in json.dumps(message)


def test_series_with_a_missing_slice_is_flagged_not_reconstructed(
    ingest_service: IngestService, ingest_worker: object, shared_data: Path
):
    files = sorted((shared_data / TCIA / "Study3" / "26401-T1prereg-52906").iterdir())
    series_uid = generate_uid()  # a copy of a real series under new UIDs, minus one slice in the middle
    with_gap = [with_new_uids(f, series_uid) for f in files[:10] + files[11:]]
    with ingest_service.client("pacs") as client:
        assert stow(client, with_gap).status_code == 200
    status = wait_for(
        lambda: (s := series_status(ingest_service, series_uid)).get("status") == "flagged" and s,
        what="series to be flagged",
    )
    assert status["non_volumetric_reason"].startswith("missing_slices")
    assert status["volumes"] == []


def test_pull_from_orthanc_over_dicomweb(
    ingest_service: IngestService, ingest_worker: object, shared_data: Path, orthanc
):
    files = sorted((shared_data / TCIA / "Study3" / "11_HCropVolume").iterdir())[:8]
    original = pydicom.dcmread(files[0])
    with httpx.Client(base_url=orthanc.url, timeout=60) as pacs:
        for path in files:
            assert pacs.post("/instances", content=path.read_bytes()).status_code == 200
    with ingest_service.client("operator") as client:
        response = client.post("/pacs/orthanc/retrieve", json={"query": {"PatientID": original.PatientID}})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        job = wait_for(
            lambda: (j := client.get(f"/pacs/jobs/{job_id}").json())["status"] in ("done", "failed") and j,
            what="pull job",
        )
        assert job["status"] == "done" and job["studies_found"] == 1
        assert job["instances_stored"] == len(files) and job["instances_failed"] == 0
        assert client.post("/pacs/nowhere/retrieve", json={"study_instance_uid": "1.2.3"}).status_code == 404
        assert client.post("/pacs/orthanc/retrieve", json={}).status_code == 422
    with ingest_service.client("researcher") as client:
        found = client.get(
            f"/dicomweb/studies/{original.StudyInstanceUID}/series/{original.SeriesInstanceUID}/instances"
        )
        assert found.status_code == 200 and len(found.json()) >= len(files)
        assert client.post("/pacs/orthanc/retrieve", json={"study_instance_uid": "1.2"}).status_code == 403


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk is installed by ci/install-system.sh")
def test_storescu_push_and_echoscu(ingest_service: IngestService, shared_data: Path):
    from services.ingest.dimse import start_receiver

    ctx = ingest_service.ctx
    port = free_port()
    ctx.settings.dimse_port = port  # type: ignore[attr-defined]
    server = start_receiver(ctx)  # type: ignore[arg-type]
    try:
        echo = subprocess.run(
            ["echoscu", "-aec", "VOXELFLOW", "127.0.0.1", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert echo.returncode == 0, echo.stderr
        files = sorted((shared_data / TCIA / "Study1" / "36459-FLAIRreg-76244").iterdir())
        push = subprocess.run(
            ["storescu", "-aet", "MODALITY", "-aec", "VOXELFLOW", "127.0.0.1", str(port), *map(str, files)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert push.returncode == 0, push.stderr
    finally:
        server.shutdown()
    pseudonymised = [ctx.deidentifier.pseudonymise_uid(pydicom.dcmread(f).SOPInstanceUID) for f in files]  # type: ignore[attr-defined]
    with ctx.session_factory() as session:  # type: ignore[attr-defined]
        stored = session.scalars(select(Instance.source).where(Instance.sop_instance_uid.in_(pseudonymised))).all()
    assert len(stored) == len(files) == 22


def test_a_task_that_fails_for_good_becomes_a_retryable_dead_letter(
    ingest_service: IngestService, ingest_worker: object
):
    from services.ingest.models import PullJob
    from shared.db.base import session_scope

    ctx = ingest_service.ctx
    with session_scope(ctx.session_factory) as session:  # type: ignore[attr-defined]
        session.add(PullJob(id="00000000-dead-0000-0000-000000000001", pacs="unconfigured", query={}, status="queued"))
    ctx.celery.send_task("ingest.pull_from_pacs", args=["00000000-dead-0000-0000-000000000001"], queue="ingest")  # type: ignore[attr-defined]
    with ingest_service.client("operator") as client:
        letters = wait_for(
            lambda: [
                d for d in client.get("/dead-letters").json() if d["args"] == ["00000000-dead-0000-0000-000000000001"]
            ],
            what="dead letter",
        )
        letter = letters[0]
        assert letter["task_name"] == "ingest.pull_from_pacs"
        assert letter["exception_type"] == "PermanentTaskError"
        assert "not configured" in letter["exception_message"]
        retried = client.post(f"/dead-letters/{letter['id']}/retry")
        assert retried.status_code == 200 and retried.json()["requeued_task_id"]
        assert client.post(f"/dead-letters/{letter['id']}/retry").status_code == 409
        assert client.post("/dead-letters/999999/retry").status_code == 404
    with ingest_service.client("researcher") as client:
        assert client.get("/dead-letters").status_code == 403
    with ctx.session_factory() as session:  # type: ignore[attr-defined]
        assert session.scalar(select(DeadLetter).where(DeadLetter.id == letter["id"])).requeued_at is not None
