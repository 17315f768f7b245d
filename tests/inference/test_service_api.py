"""The inference API on real PostgreSQL, Redis and S3: upload → segmentation, jobs, errors, auth, audit."""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Iterator
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from sqlalchemy import select

from shared.db.models import AuditEvent
from tests.inference.conftest import InferenceService, running_service
from tests.inference.served_models import MovableAliases
from tests.service_harness import wait_for


@pytest.fixture(scope="module")
def service(base_settings: dict[str, Any]) -> Iterator[InferenceService]:
    source = MovableAliases({"champion": "1"})
    with running_service({**base_settings, "sync_max_voxels": 200_000}, source) as svc:
        yield svc


def upload(svc: InferenceService, data: bytes, role: str | None = "researcher", **fields: str) -> Any:
    with svc.client(role) as client:
        return client.post("/v1/segmentations", files={"file": ("image.nii.gz", data)}, data=fields)


def test_readyz_reports_the_loaded_model(service: InferenceService) -> None:
    with service.client(None) as client:
        assert client.get("/readyz").json() == {"status": "ready"}
        metrics = client.get("/metrics").text
    assert 'voxelflow_inference_model_info{name="hippocampus-test",route="champion",version="1"} 1.0' in metrics


def test_nifti_upload_is_segmented_synchronously(service: InferenceService, hippocampus_nifti: bytes) -> None:
    response = upload(service, hippocampus_nifti, largest_component="true", request_id="upload-sync-0001")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "succeeded" and body["model_version"] == "1" and body["route"] == "champion"
    assert body["registry_uri"] == "models:/hippocampus-test/1" and body["dicom_seg_uri"] is None
    source = nib.Nifti1Image.from_bytes(gzip.decompress(hippocampus_nifti))
    with service.client() as client:
        mask_bytes = client.get(body["mask_nifti_uri"]).content
        findings = client.get(body["findings_uri"]).json()
        again = client.get(f"/v1/segmentations/{body['request_id']}").json()
        assert client.get(f"/v1/segmentations/{body['request_id']}/seg").status_code == 404
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(mask_bytes))
    # back on the source grid, although the spec reoriented and padded it to a multiple of 16
    assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)
    values = np.asarray(mask.dataobj)
    voxel_ml = abs(np.linalg.det(source.affine[:3, :3])) / 1000
    for finding in body["findings"]:
        assert finding["voxels"] == int((values == finding["label"]).sum())
        assert finding["volume_ml"] == pytest.approx(finding["voxels"] * voxel_ml)
    assert findings["findings"] == body["findings"] and findings["model_version"] == "1"
    assert again == body
    # the row is in PostgreSQL and the request was audited with its id
    with service.ctx.session_factory() as session:
        audits = session.scalars(select(AuditEvent).where(AuditEvent.path == "/v1/segmentations")).all()
    assert any(
        "upload-sync-0001" in a.object_uids and a.principal.startswith("test-inference-researcher") for a in audits
    )


def test_patient_id_is_stored_only_as_its_keyed_pseudonym(service: InferenceService, hippocampus_nifti: bytes) -> None:
    """The row keeps the HMAC pseudonym ingest would give the patient, never the MRN or its plain sha256."""
    import hashlib

    from services.inference.models import SegmentationRequest
    from shared.pseudonyms import pseudonymise_patient_id

    mrn = "MRN-00012345"
    response = upload(service, hippocampus_nifti, patient_id=mrn, request_id="keyed-ref-0001")
    assert response.status_code == 200, response.text
    settings = service.ctx.settings
    expected = pseudonymise_patient_id(settings.resolved_deid_key(), settings.project, mrn)
    with service.ctx.session_factory() as session:
        row = session.get(SegmentationRequest, "keyed-ref-0001")
    assert row is not None and row.patient_ref == expected
    assert row.patient_ref != hashlib.sha256(mrn.encode()).hexdigest()
    assert "patient_id" not in row.options and row.options["patient_ref"] == expected
    assert mrn not in json.dumps(row.options) and mrn not in response.text


def test_repeated_request_id_does_not_segment_twice(service: InferenceService, hippocampus_nifti: bytes) -> None:
    first = upload(service, hippocampus_nifti, request_id="idempotent-0001").json()
    second = upload(service, hippocampus_nifti, request_id="idempotent-0001").json()
    assert second == first


def test_bad_input_gets_a_clear_error(service: InferenceService, hippocampus_nifti: bytes) -> None:
    refused = upload(service, b"not a nifti at all")
    assert refused.status_code == 422 and "NIfTI" in refused.json()["detail"]
    # an alias that is not served is a reference to nothing, as an unknown id would be
    assert upload(service, hippocampus_nifti, model_alias="nonexistent").status_code == 404
    # form fields as documented: a flag is "true" or "false", an empty field is not an absent one
    assert upload(service, hippocampus_nifti, largest_component="yes").status_code == 422
    assert upload(service, hippocampus_nifti, request_id="").status_code == 422
    with service.client() as client:
        assert client.post("/v1/segmentations", content=b"x", headers={"Content-Type": "text/plain"}).status_code == 415
        both = client.post("/v1/segmentations", json={"series_instance_uid": "1.2", "dicomweb_series_url": "http://x"})
        assert both.status_code == 422
        outside = client.post(
            "/v1/segmentations", json={"dicomweb_series_url": "http://elsewhere:1/dw/studies/1.2/series/3.4"}
        )
        assert outside.status_code == 403
        assert client.get("/v1/segmentations/unknown-id-123").status_code == 404


def test_authentication_and_roles(service: InferenceService, hippocampus_nifti: bytes) -> None:
    assert upload(service, hippocampus_nifti, role=None).status_code == 401
    with service.client(None, headers={"Authorization": "Bearer vf_wrong"}) as client:
        assert client.get("/v1/segmentations/x").status_code == 401


def test_large_volume_becomes_a_job_done_by_the_worker(
    service: InferenceService, base_settings: dict[str, Any]
) -> None:
    from celery.contrib.testing.worker import start_worker

    import services.inference.tasks
    from services.inference import worker

    worker.use_context(service.ctx)
    big = nib.Nifti1Image(np.random.default_rng(0).random((64, 64, 64), dtype=np.float32), np.eye(4))
    data = gzip.compress(big.to_bytes())
    response = upload(service, data, request_id="job-large-0001")  # 262144 voxels > 200000
    assert response.status_code == 202, response.text
    assert response.headers["Location"] == "/v1/segmentations/job-large-0001"
    assert response.json()["status"] == "queued"
    with (
        start_worker(service.ctx.celery, queues=["inference"], perform_ping_check=False, shutdown_timeout=30),
        service.client() as client,
    ):
        done = wait_for(
            lambda: (r := client.get("/v1/segmentations/job-large-0001").json())["status"] == "succeeded" and r,
            timeout=90,
            what="the job",
        )
        mask = nib.Nifti1Image.from_bytes(gzip.decompress(client.get(done["mask_nifti_uri"]).content))
    assert mask.shape == (64, 64, 64)
    # running the task again (a redelivery) is a no-op on a finished request
    result = services.inference.tasks.segment_task.apply(args=["job-large-0001"]).get()
    assert result == {"request_id": "job-large-0001", "status": "succeeded", "model_version": "1"}


def test_backpressure_answers_429_with_retry_after(base_settings: dict[str, Any], hippocampus_nifti: bytes) -> None:
    """One slot, no queue, a slow model: while one request runs, the next gets 429 at once."""
    source = MovableAliases({"champion": "1"}, predict_delay=1.5)
    settings = {**base_settings, "max_concurrent": 1, "max_queue": 0, "retry_after_seconds": 7}
    with running_service(settings, source) as svc:
        results: list[int] = []
        slow = threading.Thread(target=lambda: results.append(upload(svc, hippocampus_nifti).status_code))
        slow.start()
        wait_for(lambda: svc.ctx.admission.admitted == 1, timeout=20, what="the first request to be admitted")
        refused = upload(svc, hippocampus_nifti)
        slow.join()
        with svc.client(None) as client:
            metrics = client.get("/metrics").text
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "7"
    assert results == [200]
    assert 'voxelflow_inference_rejected_total{reason="queue_full"}' in metrics


def test_not_ready_answers_503(base_settings: dict[str, Any], hippocampus_nifti: bytes) -> None:
    """The champion alias is not set in the registry: the API starts, is not ready and refuses with 503."""
    with running_service(base_settings, MovableAliases({})) as svc:
        with svc.client(None) as client:
            ready = client.get("/readyz")
        refused = upload(svc, hippocampus_nifti)
        # the alias appears: the next poll loads and warms it, and the service turns ready
        svc.ctx.model_source.aliases["champion"] = "4"
        svc.ctx.models.poll_once()
        with svc.client(None) as client:
            assert client.get("/readyz").status_code == 200
        assert upload(svc, hippocampus_nifti).json()["model_version"] == "4"
    assert ready.status_code == 503 and "model" in json.loads(ready.text)["failures"]
    assert refused.status_code == 503 and "Retry-After" in refused.headers


def test_invalid_json_bytes_are_422_not_500(service: InferenceService) -> None:
    """Found by the fuzz stage: the 422 detail echoed the undecodable input bytes and failed to serialise."""
    with service.client("researcher") as client:
        response = client.post("/v1/segmentations", content=b"\x00\xff", headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["type"] == "json_invalid"
