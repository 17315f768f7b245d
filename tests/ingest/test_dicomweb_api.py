"""The ingest API over real HTTP, on real PostgreSQL, S3 (SeaweedFS) and Redis, with the real data."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select

from services.ingest.models import Instance, Series
from shared.db.models import AuditEvent
from tests.ingest.conftest import IngestService, multipart_body, stow

TCIA = "tcia_brain_tumor_progression_mr"
FAILED = "00081198"
REFERENCED = "00081199"
FAILURE_REASON = "00081197"


def dicom_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name not in ("SHA256SUMS",) and _is_dicom(p))


def _is_dicom(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def count_instances(service: IngestService) -> int:
    with service.ctx.session_factory() as session:  # type: ignore[attr-defined]
        return int(session.scalar(select(func.count(Instance.id))) or 0)


def failure_codes(response_json: dict) -> list[int]:
    return [item[FAILURE_REASON]["Value"][0] for item in response_json.get(FAILED, {}).get("Value", [])]


def minimal_image(**overrides: object) -> bytes:
    """A small valid CT image; overrides set (or with None delete) attributes."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "SYNTH-1"
    ds.PatientName = "Synthetic^Patient"
    ds.Modality = "CT"
    ds.StudyDate = "20200101"
    ds.Rows, ds.Columns = 4, 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = bytes(range(32))
    for key, value in overrides.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    return buffer.getvalue()


# The TotalSegmentator CT files were anonymised upstream down to empty Study/Series/SOP Instance UIDs:
# no catalogue can place them, so ingest must refuse them (and only them) with a clear reason.
UNPLACEABLE = "totalsegmentator_ct_example"


@pytest.fixture(scope="module")
def stored_everything(ingest_service: IngestService, shared_data: Path) -> dict[str, object]:
    """STOW every DICOM file of the bundled data, in batches as a PACS would send them."""
    files = dicom_files(shared_data)
    placeable = [p for p in files if UNPLACEABLE not in p.parts]
    outcome: dict[str, object] = {"files": len(placeable), "stored": 0, "failed": 0}
    with ingest_service.client("pacs") as client:
        for start in range(0, len(placeable), 25):
            batch = [p.read_bytes() for p in placeable[start : start + 25]]
            response = stow(client, batch)
            assert response.status_code in (200, 202), response.text
            body = response.json()
            outcome["stored"] += len(body.get(REFERENCED, {}).get("Value", []))  # type: ignore[operator]
            outcome["failed"] += len(body.get(FAILED, {}).get("Value", []))  # type: ignore[operator]
        refused = stow(client, [p.read_bytes() for p in files if UNPLACEABLE in p.parts])
        outcome["refused"] = refused
    return outcome


def test_stow_stores_every_bundled_dicom_file(stored_everything: dict[str, object], ingest_service: IngestService):
    assert stored_everything["files"] > 280  # type: ignore[operator]
    assert stored_everything["failed"] == 0, stored_everything
    assert stored_everything["stored"] == stored_everything["files"]
    assert count_instances(ingest_service) >= stored_everything["files"]  # type: ignore[operator]


def test_files_without_study_or_series_uid_are_refused_with_the_reason(stored_everything: dict[str, object]):
    refused = stored_everything["refused"]
    assert refused.status_code == 409  # type: ignore[attr-defined]
    items = refused.json()[FAILED]["Value"]  # type: ignore[attr-defined]
    assert len(items) == 20
    assert all(item[FAILURE_REASON]["Value"] == [0xA900] for item in items)
    assert all("StudyInstanceUID, SeriesInstanceUID" in item["00000902"]["Value"][0] for item in items)


def test_qido_finds_studies_by_original_and_pseudonymised_patient_id(
    stored_everything: dict[str, object], ingest_service: IngestService
):
    with ingest_service.client("pacs") as client:  # the sender knows the original PatientID
        by_original = client.get("/dicomweb/studies", params={"PatientID": "PGBM-002"})
        assert by_original.status_code == 200
        studies = by_original.json()
        assert len(studies) == 1
        pseudonym = studies[0]["00100020"]["Value"][0]
        assert pseudonym.startswith("VF-") and "PGBM" not in str(studies)
        assert studies[0]["00080061"]["Value"] == ["MR"]
        assert int(studies[0]["00201206"]["Value"][0]) == 5  # four full series + the HippoCrop series
    with ingest_service.client("researcher") as client:
        by_pseudonym = client.get("/dicomweb/studies", params={"00100020": pseudonym}).json()
        assert by_pseudonym[0]["0020000D"] == studies[0]["0020000D"]


def test_researcher_cannot_map_an_original_patient_id_to_its_pseudonym(
    stored_everything: dict[str, object], ingest_service: IngestService
):
    """Only PACS and admin may search by original identifiers: a researcher's PatientID or PatientName
    matches stored pseudonyms only, so an MRN finds nothing (204) while its pseudonym finds the study."""
    pseudonym = ingest_service.ctx.deidentifier.pseudonymise_patient_id("PGBM-002")  # type: ignore[attr-defined]
    with ingest_service.client("researcher") as client:
        for key in ("PatientID", "00100020", "PatientName"):
            assert client.get("/dicomweb/studies", params={key: "PGBM-002"}).status_code == 204, key
        assert client.get("/dicomweb/series", params={"PatientID": "PGBM-002"}).status_code == 204
        assert client.get("/dicomweb/studies", params={"PatientID": pseudonym}).status_code == 200
    with ingest_service.client("admin") as client:
        assert client.get("/dicomweb/studies", params={"PatientID": "PGBM-002"}).status_code == 200


def test_qido_matching_keys_limit_offset_and_includefield(
    stored_everything: dict[str, object], ingest_service: IngestService
):
    with ingest_service.client("researcher") as client:
        ct = client.get("/dicomweb/studies", params={"ModalitiesInStudy": "CT"}).json()
        assert ct and all("CT" in s["00080061"]["Value"] for s in ct)
        every = client.get("/dicomweb/studies").json()
        page = client.get("/dicomweb/studies", params={"limit": 2, "offset": 1}).json()
        assert [s["0020000D"] for s in page] == [s["0020000D"] for s in every[1:3]]
        dated = [s for s in every if "Value" in s["00080020"]]
        assert dated, "shifted study dates are kept for range queries"
        date = dated[0]["00080020"]["Value"][0]
        in_range = client.get("/dicomweb/studies", params={"StudyDate": f"{date}-{date}"}).json()
        assert dated[0]["0020000D"] in [s["0020000D"] for s in in_range]
        assert client.get("/dicomweb/studies", params={"StudyDate": "19000101-19000102"}).status_code == 204
        study_uid = dated[0]["0020000D"]["Value"][0]
        series = client.get(f"/dicomweb/studies/{study_uid}/series", params={"includefield": "BodyPartExamined"})
        assert series.status_code == 200 and all(s["0020000D"]["Value"] == [study_uid] for s in series.json())
        series_uid = series.json()[0]["0020000E"]["Value"][0]
        instances = client.get(
            f"/dicomweb/studies/{study_uid}/series/{series_uid}/instances", params={"includefield": "all"}
        ).json()
        assert instances and all("00280030" in i or "52009229" in i or "00280010" in i for i in instances)
        assert client.get("/dicomweb/studies", params={"NoSuchKey": "1"}).status_code == 400
        assert client.get("/dicomweb/studies", params={"limit": "x"}).status_code == 400
        assert client.get("/dicomweb/studies/1.2.3.4/series").status_code == 404


def test_wado_returns_deidentified_instances_with_identical_pixels(
    stored_everything: dict[str, object], ingest_service: IngestService, shared_data: Path
):
    original_path = sorted((shared_data / TCIA / "Study1" / "13_HCropVolume").iterdir())[0]
    original = pydicom.dcmread(original_path)
    with ingest_service.client("researcher") as client:
        found = client.get(
            "/dicomweb/studies",
            params={"StudyInstanceUID": original.StudyInstanceUID},
        ).json()
        study_uid = found[0]["0020000D"]["Value"][0]
        assert study_uid != original.StudyInstanceUID
        response = client.get(
            f"/dicomweb/studies/{original.StudyInstanceUID}/series/{original.SeriesInstanceUID}"
            f"/instances/{original.SOPInstanceUID}"
        )
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("multipart/related")
        from services.ingest.dicomweb import stow_boundary  # same multipart grammar both ways

        boundary = stow_boundary(response.headers["content-type"]).decode()
        parts = [p for p in response.content.split(f"--{boundary}".encode()) if b"\r\n\r\n" in p]
        assert len(parts) == 1
        payload = parts[0].split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n", 1)[0]
        retrieved = pydicom.dcmread(io.BytesIO(payload))
        assert retrieved.PatientID.startswith("VF-") and retrieved.PatientID != original.PatientID
        assert str(retrieved.StudyInstanceUID) == study_uid
        assert (retrieved.pixel_array == original.pixel_array).all()
        assert retrieved.PatientIdentityRemoved == "YES"
        metadata = client.get(f"/dicomweb/studies/{study_uid}/metadata")
        assert metadata.status_code == 200 and len(metadata.json()) == 4 * 22 + 32  # Study1: 4 full series + crop
        # pixel data never inline: only as a BulkDataURI (PS3.18 F.2.7)
        assert all(set(item["7FE00010"]) == {"vr", "BulkDataURI"} for item in metadata.json())
        assert client.get("/dicomweb/studies/1.2.3.999").status_code == 404


def test_same_instance_twice_is_stored_once_and_different_content_is_a_conflict(
    ingest_service: IngestService,
):
    data = minimal_image()
    with ingest_service.client("pacs") as client:
        before = count_instances(ingest_service)
        assert stow(client, [data]).status_code == 200
        again = stow(client, [data])
        assert again.status_code == 200 and len(again.json()[REFERENCED]["Value"]) == 1
        assert count_instances(ingest_service) == before + 1
        original = pydicom.dcmread(io.BytesIO(data), force=True)
        changed = minimal_image(
            SOPInstanceUID=original.SOPInstanceUID,
            StudyInstanceUID=original.StudyInstanceUID,
            SeriesInstanceUID=original.SeriesInstanceUID,
            PixelData=bytes(reversed(range(32))),
        )
        conflict = stow(client, [changed])
        assert conflict.status_code == 409
        assert failure_codes(conflict.json()) == [0x0111]
        assert count_instances(ingest_service) == before + 1


def test_bad_instances_are_reported_one_by_one_and_good_ones_stored(ingest_service: IngestService):
    sr = minimal_image(SOPClassUID="1.2.840.10008.5.1.4.1.1.88.11")  # Basic Text SR
    cases = {
        "unparseable": b"this is not DICOM at all" * 10,
        "truncated_header": minimal_image()[:200],
        "truncated_pixels": minimal_image()[:-10],
        "missing_uid": minimal_image(SeriesInstanceUID=None),
        "unsupported": sr,
        "no_pixels": minimal_image(PixelData=None),
        "bad_uid": minimal_image(StudyInstanceUID="1.2.abc"),
    }
    good = [minimal_image(), minimal_image()]
    with ingest_service.client("pacs") as client:
        before = count_instances(ingest_service)
        response = stow(client, [good[0], *cases.values(), good[1]])
        assert response.status_code == 202, response.text
        body = response.json()
        assert len(body[REFERENCED]["Value"]) == 2
        codes = failure_codes(body)
        assert len(codes) == len(cases)
        assert codes == [0xC000, 0xA900, 0xA900, 0xA900, 0x0122, 0xA900, 0xA900]
        comments = [item["00000902"]["Value"][0] for item in body[FAILED]["Value"]]
        assert comments[2].startswith("pixel_data_size: pixel data holds 22 bytes, the image attributes need 32")
        assert comments[3].startswith("missing_attribute") and "SeriesInstanceUID" in comments[3]
        assert comments[4].startswith("unsupported_sop_class")
        assert count_instances(ingest_service) == before + 2


def test_request_level_errors(ingest_service: IngestService):
    data = minimal_image()
    body, content_type = multipart_body([data])
    with ingest_service.client("pacs") as client:
        assert (
            client.post("/dicomweb/studies", content=data, headers={"Content-Type": "application/dicom"}).status_code
            == 415
        )
        json_form = content_type.replace("application/dicom", "application/dicom+json")
        assert client.post("/dicomweb/studies", content=body, headers={"Content-Type": json_form}).status_code == 415
        no_boundary = 'multipart/related; type="application/dicom"'
        assert client.post("/dicomweb/studies", content=body, headers={"Content-Type": no_boundary}).status_code == 400
        oversized = b"x" * (64 * 1024**2 + 1)
        response = client.post("/dicomweb/studies", content=oversized, headers={"Content-Type": content_type})
        assert response.status_code == 413
        other_study = stow(client, [data], study="1.2.3.4.5")
        assert other_study.status_code == 409 and failure_codes(other_study.json()) == [0xC409]
    with ingest_service.client(role="") as anonymous:
        assert (
            anonymous.post("/dicomweb/studies", content=body, headers={"Content-Type": content_type}).status_code == 401
        )
        assert anonymous.get("/dicomweb/studies").status_code == 401
    with ingest_service.client("researcher") as researcher:
        assert (
            researcher.post("/dicomweb/studies", content=body, headers={"Content-Type": content_type}).status_code
            == 403
        )
        assert researcher.get("/admin/reidentification", params={"value": "x"}).status_code == 403
    import httpx

    with httpx.Client(base_url=ingest_service.url, headers={"Authorization": "Bearer vf_wrong"}) as wrong:
        assert wrong.get("/dicomweb/studies").status_code == 401


def test_concurrent_stow_loses_nothing(ingest_service: IngestService, shared_data: Path):
    from concurrent.futures import ThreadPoolExecutor

    files = [p.read_bytes() for p in sorted((shared_data / TCIA / "Study3" / "11_HCropVolume").iterdir())]
    # four clients send overlapping halves of the same series at the same time
    batches = [files[: len(files) // 2 + 5], files[len(files) // 2 - 5 :], files, files[::-1]]

    def send(batch: list[bytes]) -> int:
        with ingest_service.client("pacs") as client:
            response = stow(client, batch)
            assert response.status_code == 200, response.text
            return len(response.json()[REFERENCED]["Value"])

    with ThreadPoolExecutor(4) as pool:
        accepted = list(pool.map(send, batches))
    assert accepted == [len(b) for b in batches]
    original = pydicom.dcmread(io.BytesIO(files[0]))
    with ingest_service.client("researcher") as client:
        listed = client.get(
            f"/dicomweb/studies/{original.StudyInstanceUID}/series/{original.SeriesInstanceUID}/instances",
            params={"limit": 1000},
        ).json()
    assert len(listed) == len(files) == 40


def test_every_request_is_audited_and_reidentification_is_admin_only(ingest_service: IngestService):
    data = minimal_image(PatientID="AUDIT-ME")
    original = pydicom.dcmread(io.BytesIO(data), force=True)
    with ingest_service.client("pacs") as client:
        stored = stow(client, [data]).json()
    url = stored[REFERENCED]["Value"][0]["00081190"]["Value"][0]
    new_sop_uid = url.rsplit("/", 1)[1]
    with ingest_service.client("admin") as admin:
        rows = admin.get("/admin/reidentification", params={"value": new_sop_uid}).json()
        assert rows == [
            {
                "kind": "uid",
                "pseudonym": new_sop_uid,
                "original": original.SOPInstanceUID,
                "date_offset_days": None,
            }
        ]
        patient = admin.get("/admin/reidentification", params={"value": "AUDIT-ME"}).json()
        assert patient[0]["kind"] == "patient" and patient[0]["pseudonym"].startswith("VF-")
    with ingest_service.client(role="") as anonymous:
        anonymous.get("/dicomweb/studies")
    with ingest_service.ctx.session_factory() as session:  # type: ignore[attr-defined]
        events = list(session.scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(20)))
    stow_event = next(e for e in events if e.method == "POST" and new_sop_uid in e.object_uids)
    assert stow_event.role == "pacs" and stow_event.outcome == "success" and stow_event.status_code == 200
    reid_event = next(e for e in events if e.path == "/admin/reidentification" and e.role == "admin")
    assert reid_event.outcome == "success"
    denied = next(e for e in events if e.principal is None)
    assert denied.status_code == 401 and denied.outcome == "denied"


def test_metrics_and_health(ingest_service: IngestService):
    import httpx

    with httpx.Client(base_url=ingest_service.url) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").status_code == 200
        metrics = client.get("/metrics").text
        assert client.get("/openapi.json").status_code == 401  # the schema needs a token (VOXELFLOW_PUBLIC_API_DOCS)
        token = {"Authorization": f"Bearer {ingest_service.tokens['researcher']}"}
        openapi = client.get("/openapi.json", headers=token).json()
    for name in (
        "voxelflow_ingest_instances_received_total",
        "voxelflow_ingest_instances_rejected_total",
        "voxelflow_http_request_duration_seconds_bucket",
        "voxelflow_celery_queue_length",
    ):
        assert name in metrics
    assert "/dicomweb/studies" in openapi["paths"]
    with ingest_service.ctx.session_factory() as session:  # type: ignore[attr-defined]
        assert session.scalar(select(func.count(Series.id))) > 0
