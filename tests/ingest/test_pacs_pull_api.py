"""A PACS pull over DIMSE through the API, the CLI and the real Celery worker, against the real Orthanc:
C-FIND + C-MOVE (into voxelflow's receiver) and C-FIND + C-GET; audited, idempotent, time-limited."""

from __future__ import annotations

import json
import secrets
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from services.ingest.models import PullJob
from shared.contracts.tasks import INGEST_QUEUE, PULL_FROM_PACS_TASK
from shared.db.base import session_scope
from shared.db.models import AuditEvent
from tests.ingest.conftest import IngestService, PacsStudy, upload_fresh_study
from tests.ingest.test_pacs_sources import stored_in_series
from tests.service_harness import wait_for

TCIA = "tcia_brain_tumor_progression_mr"


@pytest.fixture
def study(orthanc, shared_data: Path) -> PacsStudy:
    crop = sorted((shared_data / TCIA / "Study2" / "14_HCropVolume").iterdir())[:10]
    t2 = sorted((shared_data / TCIA / "Study1" / "37916-T2reg-88910").iterdir())[:3]
    return upload_fresh_study(orthanc, [crop, t2], secrets.token_hex(4).upper())


def finished(client, job_id: str) -> dict:
    return wait_for(
        lambda: (j := client.get(f"/pacs/jobs/{job_id}").json())["status"] in ("done", "failed") and j,
        what=f"pull job {job_id}",
        timeout=120,
    )


def audit_rows(service: IngestService, job_id: str) -> list[AuditEvent]:
    with service.ctx.session_factory() as session:  # type: ignore[attr-defined]
        rows = list(session.scalars(select(AuditEvent).where(AuditEvent.request_id == job_id).order_by(AuditEvent.id)))
        session.expunge_all()
    return rows


@pytest.mark.parametrize(("pacs", "retrieve_method"), [("orthanc-dimse", "C-MOVE"), ("orthanc-dimse-get", "C-GET")])
def test_pull_over_dimse_through_the_api_is_audited(
    pacs: str,
    retrieve_method: str,
    study: PacsStudy,
    ingest_service: IngestService,
    ingest_worker: object,
    pacs_receiver: int,
    orthanc,
):
    total = sum(len(uids) for uids in study.series.values())
    with ingest_service.client("operator") as client:
        assert pacs in client.get("/pacs").json()
        response = client.post(f"/pacs/{pacs}/retrieve", json={"query": {"PatientID": study.patient_id}})
        assert response.status_code == 202, response.text
        job = finished(client, response.json()["id"])
    assert job["status"] == "done", job
    assert (job["studies_found"], job["instances_stored"], job["instances_failed"], job["error"]) == (1, total, 0, None)
    for series_uid, uids in study.series.items():
        assert stored_in_series(ingest_service, series_uid) == len(uids)

    rows = audit_rows(ingest_service, job["id"])
    assert [r.method for r in rows] == ["C-FIND", "C-FIND", retrieve_method, retrieve_method]
    assert all(r.path == f"dimse://{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}" for r in rows)
    assert all(r.role == "operator" and r.principal and r.principal.startswith("test-operator") for r in rows)
    assert all(r.outcome == "success" and r.status_code == 0 for r in rows)
    logged = json.dumps([r.object_uids for r in rows])
    pseudonymise = ingest_service.ctx.deidentifier.pseudonymise_uid  # type: ignore[attr-defined]
    assert study.study_uid not in logged and pseudonymise(study.study_uid) in logged
    if retrieve_method == "C-MOVE":  # the instances came in through the receiver, which audits them too
        uid = pseudonymise(next(iter(study.series.values()))[0])
        with ingest_service.ctx.session_factory() as session:  # type: ignore[attr-defined]
            stores = session.scalars(select(AuditEvent).where(AuditEvent.method == "C-STORE")).all()
            store = [e for e in stores if uid in e.object_uids]
        assert store and store[0].principal.startswith(f"dimse:{orthanc.aet}@")


def test_series_keys_pull_only_those_series_and_bad_keys_are_422(
    study: PacsStudy, ingest_service: IngestService, ingest_worker: object, pacs_receiver: int
):
    wanted, other = list(study.series)
    with ingest_service.client("operator") as client:
        query = {"PatientID": study.patient_id, "SeriesInstanceUID": wanted}
        job = finished(client, client.post("/pacs/orthanc-dimse/retrieve", json={"query": query}).json()["id"])
        assert job["status"] == "done" and job["instances_stored"] == len(study.series[wanted])
        assert stored_in_series(ingest_service, wanted) == len(study.series[wanted])
        assert stored_in_series(ingest_service, other) == 0
        refused = client.post("/pacs/orthanc-dimse/retrieve", json={"query": {"InstanceNumber": "1"}})
        assert refused.status_code == 422 and "not a pull matching key" in refused.text


def test_a_redelivered_pull_that_is_done_does_nothing_again(
    study: PacsStudy, ingest_service: IngestService, ingest_worker: object, pacs_receiver: int
):
    ctx = ingest_service.ctx
    with ingest_service.client("operator") as client:
        body = {"study_instance_uid": study.study_uid}
        job = finished(client, client.post("/pacs/orthanc-dimse-get/retrieve", json=body).json()["id"])
    assert job["status"] == "done"
    rows_before = len(audit_rows(ingest_service, job["id"]))
    result = ctx.celery.send_task(PULL_FROM_PACS_TASK, args=[job["id"]], queue=INGEST_QUEUE)  # type: ignore[attr-defined]
    assert result.get(timeout=60)["status"] == "done"
    with ingest_service.client("operator") as client:
        assert client.get(f"/pacs/jobs/{job['id']}").json() == job
    assert len(audit_rows(ingest_service, job["id"])) == rows_before


def test_a_pull_from_a_pacs_that_hangs_ends_at_the_task_time_limit(
    ingest_service: IngestService, ingest_worker: object
):
    """The 'silent' PACS accepts the connection and never answers (its timeout_seconds is 600): only the
    task's soft time limit, here 2 s for this call, ends the pull, which is then failed with the reason."""
    ctx = ingest_service.ctx
    job_id = str(uuid.uuid4())
    with session_scope(ctx.session_factory) as session:  # type: ignore[attr-defined]
        session.add(PullJob(id=job_id, pacs="silent", query={"PatientID": "X"}, status="queued"))
    ctx.celery.send_task(  # type: ignore[attr-defined]
        PULL_FROM_PACS_TASK, args=[job_id], queue=INGEST_QUEUE, soft_time_limit=2, time_limit=20
    )
    with ingest_service.client("operator") as client:
        job = finished(client, job_id)
    assert job["status"] == "failed" and "soft time limit of 2 s" in job["error"], job


def test_the_cli_pulls_and_shows_the_job(
    study: PacsStudy,
    ingest_service: IngestService,
    ingest_worker: object,
    pacs_receiver: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    from shared.cli import main

    monkeypatch.setenv("VOXELFLOW_INGEST_API_URL", ingest_service.url)
    monkeypatch.setenv("VOXELFLOW_TOKEN", ingest_service.tokens["operator"])
    main(["pacs", "list"])
    assert "orthanc-dimse " in capsys.readouterr().out
    main(["pacs", "pull", "orthanc-dimse", "--query", f"PatientID={study.patient_id}", "--wait", "120"])
    captured = capsys.readouterr()
    job_id = captured.out.strip()
    assert '"status": "done"' in captured.err
    main(["pacs", "job", job_id])
    shown = json.loads(capsys.readouterr().out)
    assert shown["instances_stored"] == sum(len(u) for u in study.series.values())
    with pytest.raises(SystemExit) as exited:
        main(["pacs", "pull", "nowhere", "--study", "1.2.3"])
    assert "no PACS named 'nowhere'" in str(exited.value.code)
    with pytest.raises(SystemExit) as exited:
        main(["pacs", "pull", "orthanc-dimse", "--query", "PatientID"])
    assert "expected KEY=VALUE" in str(exited.value.code)
