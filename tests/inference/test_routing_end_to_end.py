# ruff: noqa: F811  (fixtures imported from other modules are re-bound as arguments)
"""Routing rules end to end, with no call by anyone after the rules are made: a series C-STOREd to ingest is
finalised by the real ingest worker, offered on the routing queue, matched by the inference worker, segmented,
and its DICOM SEG + SR land in the destination Orthanc; a series no rule matches is offered and left alone;
a rule whose destination is down retries, then fails with a dead letter. Every step is an audit row.

Real parts: PostgreSQL, Redis, S3, Orthanc, the ingest API + its Celery worker process + its DICOM receiver,
the inference API + a Celery worker on its queues (in this process, so that the test reads its metrics). Only
the model is the test's tiny UNet (tests.inference.served_models). The series get fresh UIDs, so nothing
another test stored makes them duplicates.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
import redis
from dicomweb_client import DICOMwebClient
from prometheus_client import REGISTRY
from pydicom.uid import generate_uid
from pynetdicom import AE
from sqlalchemy import select

from shared.db.models import AuditEvent, DeadLetter
from tests.inference.conftest import InferenceService, running_service
from tests.inference.served_models import MovableAliases
from tests.ingest.conftest import (  # noqa: F401  (fixtures)
    ROUTING_TEST_QUEUE,
    IngestService,
    ingest_env,
    ingest_service,
    ingest_worker,
    stow,
)
from tests.service_harness import free_port, wait_for

TCIA = "tcia_brain_tumor_progression_mr/Study1"
SCANNER_AE = "ROUTE-SCANNER"


def fresh_series(files: list[Path], study_uid: str, series_number: int) -> list[pydicom.Dataset]:
    """The files as a new series of ``study_uid`` (new series and instance UIDs, same pixels and geometry), of
    a patient of its own: the ingest catalogue is shared with tests that count the studies of the TCIA ones."""
    series_uid = generate_uid()
    datasets: list[pydicom.Dataset] = []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = study_uid, series_uid, series_number
        ds.PatientID, ds.PatientName = "ROUTING-TEST", "Routing^Test"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        datasets.append(ds)
    return datasets


def c_store(datasets: list[pydicom.Dataset], port: int) -> None:
    """Send as a scanner would: C-STORE from AE ``ROUTE-SCANNER`` to voxelflow's receiver."""
    ae = AE(ae_title=SCANNER_AE)
    for uid in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(uid, sorted({str(ds.file_meta.TransferSyntaxUID) for ds in datasets}))
    assoc = ae.associate("127.0.0.1", port)
    assert assoc.is_established
    try:
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()


def part10(ds: pydicom.Dataset) -> bytes:
    from pydicom.filebase import DicomBytesIO

    out = DicomBytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def counter(rule: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("voxelflow_routing_series_total", {"rule": rule, "outcome": outcome}) or 0.0


@pytest.fixture(scope="module")
def inference(base_settings: dict[str, Any], ingest_service: IngestService, orthanc: Any) -> Iterator[InferenceService]:
    settings = {
        **base_settings,
        "ingest_url": ingest_service.url,
        "ingest_token": ingest_service.tokens["researcher"],
        "pacs_url": f"{orthanc.url}/dicom-web",
    }
    with running_service(settings, MovableAliases({"champion": "3"})) as svc:
        yield svc


def pseudonymised_series(ingest_service: IngestService, original: pydicom.Dataset) -> tuple[str, str]:
    """(study, series) UIDs the catalogue gave ``original``'s series, found by the sender's own study UID."""
    with ingest_service.client("pacs") as client:
        studies = client.get("/dicomweb/studies", params={"StudyInstanceUID": original.StudyInstanceUID}).json()
        assert len(studies) == 1, studies
        study = studies[0]["0020000D"]["Value"][0]
        series = client.get(f"/dicomweb/studies/{study}/series").json()
    found = [s["0020000E"]["Value"][0] for s in series if s["00200011"]["Value"][0] == original.SeriesNumber]
    assert len(found) == 1
    return study, found[0]


def test_matching_series_is_segmented_and_sent_the_other_is_not(
    inference: InferenceService,
    ingest_service: IngestService,
    ingest_worker: object,
    orthanc: Any,
    shared_data: Path,
) -> None:
    from celery.contrib.testing.worker import start_worker

    import services.inference.tasks  # noqa: F401  (registers the tasks with the worker)
    from services.inference import series_routing, worker
    from services.ingest.dimse import start_receiver

    dead_port = free_port()  # nothing listens: every send is refused at once, so the task retries, then gives up
    rules = [
        {
            "name": "e2e-hippocrop",
            "modality": "MR",
            "series_description_pattern": "(?i)^hippocrop$",
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.4",
            "calling_ae_title": SCANNER_AE,
            "site": "test-site",
            "model_alias": "champion",
            "destination": f"{orthanc.url}/dicom-web",
        },
        {
            "name": "e2e-dead-destination",
            "calling_ae_title": SCANNER_AE,
            "series_description_pattern": "HippoCrop",
            "model_alias": "champion",
            "destination": f"http://127.0.0.1:{dead_port}/dicom-web",
        },
    ]
    with inference.client("operator") as client:
        made = [client.post("/v1/routing-rules", json=rule) for rule in rules]
        assert [r.status_code for r in made] == [201, 201], [r.text for r in made]
        rule_ids = [r.json()["id"] for r in made]
        listed = {r["name"] for r in client.get("/v1/routing-rules").json()}
    assert {"e2e-hippocrop", "e2e-dead-destination"} <= listed

    study_uid = generate_uid()
    matching = fresh_series(sorted((shared_data / TCIA / "13_HCropVolume").glob("*.dcm")), study_uid, 9013)
    other = fresh_series(sorted((shared_data / TCIA / "12-T1post-05670").glob("*.dcm")), study_uid, 9012)
    redis.Redis.from_url(inference.ctx.settings.broker_url).delete(ROUTING_TEST_QUEUE)  # other tests' offers

    worker.use_context(inference.ctx)
    try:
        with start_worker(
            inference.ctx.celery,
            queues=["inference", ROUTING_TEST_QUEUE],
            perform_ping_check=False,
            shutdown_timeout=30,
        ):
            # a scanner sends the series it matches (AE, description). The receiver is this test's own, on a
            # free port: the session-scoped one of tests/ingest, imported here, would be a second instance
            # holding Orthanc's receiver port for the rest of the session.
            receiver_port = free_port()
            receiver = start_receiver(ingest_service.ctx, port=receiver_port)  # type: ignore[arg-type]
            try:
                c_store(matching, receiver_port)
            finally:
                receiver.shutdown()
            with ingest_service.client("pacs") as client:  # the other series comes by STOW-RS, described T1post
                assert stow(client, [part10(ds) for ds in other]).status_code == 200
            study, routed_series = pseudonymised_series(ingest_service, matching[0])
            _, other_series = pseudonymised_series(ingest_service, other[0])

            # ingest offers each series once finalised (task id: its series and generation); wait on the results
            def offer(series_uid: str) -> dict[str, Any]:
                result = inference.ctx.celery.AsyncResult(f"route-series-{series_uid}-g1")
                return result.get(timeout=180)

            assert offer(other_series)["requests"] == []
            good_id, dead_id = offer(routed_series)["requests"]

            def finished(request_id: str) -> dict[str, Any] | None:
                with inference.client() as client:
                    body = client.get(f"/v1/segmentations/{request_id}").json()
                return body if body["status"] in ("succeeded", "failed") else None

            done = wait_for(lambda: finished(good_id), timeout=180, what="the routed segmentation")
            assert done["status"] == "succeeded", done
            assert (done["pacs_status"], done["model_version"]) == ("sent", "3")
            # the dead destination: 5 retries with backoff (about 30 s), then a dead letter
            gave_up = wait_for(lambda: finished(dead_id), timeout=240, what="the dead destination to be given up")
            assert gave_up["status"] == "failed" and "Connection" in gave_up["error"]
            letter = wait_for(
                lambda: (
                    inference.ctx.session_factory()
                    .scalars(select(DeadLetter).where(DeadLetter.task_name == "inference.segment"))
                    .all()
                ),
                what="the dead letter",
            )
            assert any(d.args == [dead_id] and d.retries == 5 for d in letter)

            # a redelivered offer makes no second request and no second ROUTED row
            message = series_routing.SeriesIngested(
                series_instance_uid=routed_series,
                study_instance_uid=study,
                modality="MR",
                series_description="HippoCrop",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                calling_ae_title=SCANNER_AE,
                site="test-site",
                volume_uri="volumes/x",
            )
            assert series_routing.route_series(inference.ctx, message) == [good_id, dead_id]
    finally:
        with inference.client("operator") as client:  # later tests must not be routed by these rules
            for rule_id in rule_ids:
                client.delete(f"/v1/routing-rules/{rule_id}")

    # the SEG and the SR are in the destination Orthanc, for the routed series only
    dicomweb = DICOMwebClient(f"{orthanc.url}/dicom-web")
    segs = [pydicom.Dataset.from_json(s) for s in dicomweb.search_for_series(study, search_filters={"Modality": "SEG"})]
    assert len(segs) == 1
    seg = hd.seg.Segmentation.from_dataset(dicomweb.retrieve_series(study, segs[0].SeriesInstanceUID)[0])
    assert [ref.SeriesInstanceUID for ref in seg.ReferencedSeriesSequence] == [routed_series]
    assert len(dicomweb.search_for_series(study, search_filters={"Modality": "SR"})) == 1
    assert seg.ContentDescription == f"request {good_id}"  # made by the routed request

    # an audit row per step, with the rule as principal
    with inference.ctx.session_factory() as session:
        rows = session.scalars(select(AuditEvent).where(AuditEvent.principal.like("routing-rule:%"))).all()
    steps = {(r.request_id, r.method, r.outcome) for r in rows}
    assert {(good_id, "ROUTED", "success"), (good_id, "SEGMENTED", "success"), (good_id, "SENT", "success")} <= steps
    assert (dead_id, "FAILED", "error") in steps and (dead_id, "SENT", "success") not in steps
    assert not any(other_series in r.object_uids for r in rows)
    assert [r.method for r in rows if r.request_id == good_id].count("ROUTED") == 1
    for step in rows:
        assert step.principal == f"routing-rule:{rules[0 if step.request_id == good_id else 1]['name']}"
        assert study in step.object_uids

    # and counted per rule
    assert (counter("e2e-hippocrop", "routed"), counter("e2e-hippocrop", "succeeded")) == (1, 1)
    assert counter("e2e-hippocrop", "failed") == 0
    assert (counter("e2e-dead-destination", "routed"), counter("e2e-dead-destination", "failed")) == (1, 1)
