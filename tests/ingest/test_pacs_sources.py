"""One contract for every way voxelflow pulls from a PACS: DICOMweb (QIDO-RS + WADO-RS) and DIMSE
(C-FIND + C-MOVE, C-FIND + C-GET), each against the real Orthanc of the test stack.

Each test gets a study of its own, copied from the bundled real series under fresh UIDs, so that what a
retrieve puts into the catalogue is new there (a C-MOVE that did nothing could not pass on instances an
earlier test stored). C-MOVE lands in voxelflow's C-STORE receiver, on the port Orthanc's configuration
names (``pacs_receiver``).
"""

from __future__ import annotations

import io
import secrets
import time
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from services.ingest.models import Instance, Series
from services.ingest.pacs_pull import (
    CatalogueSink,
    PacsSource,
    PacsUnavailableError,
    PullQueryError,
    open_source,
    split_query,
)
from services.ingest.settings import PacsConnection
from tests.ingest.conftest import IngestService, PacsStudy, upload_fresh_study

TCIA = "tcia_brain_tumor_progression_mr"
KINDS = ["dicomweb", "dimse-move", "dimse-get"]


def connection(kind: str, orthanc, **overrides: object) -> PacsConnection:
    if kind == "dicomweb":
        fields: dict[str, object] = {"url": f"{orthanc.url}/dicom-web"}
    else:
        fields = {
            "url": f"dimse://{orthanc.aet}@{orthanc.host}:{orthanc.dicom_port}",
            "retrieve": "get" if kind == "dimse-get" else "move",
        }
    return PacsConnection.model_validate({**fields, "timeout_seconds": 30, **overrides})


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def source(kind: str, orthanc, ingest_service: IngestService, pacs_receiver: int) -> PacsSource:
    return open_source(connection(kind, orthanc), ingest_service.ctx.settings)  # type: ignore[attr-defined]


@pytest.fixture
def study(orthanc, shared_data: Path) -> PacsStudy:
    crop = sorted((shared_data / TCIA / "Study1" / "13_HCropVolume").iterdir())[:12]
    flair = sorted((shared_data / TCIA / "Study3" / "36468-FLAIRreg-58706").iterdir())[:4]
    return upload_fresh_study(orthanc, [crop, flair], secrets.token_hex(4))


def stored_in_series(service: IngestService, original_series_uid: str) -> int:
    pseudonym = service.ctx.deidentifier.pseudonymise_uid(original_series_uid)  # type: ignore[attr-defined]
    with service.ctx.session_factory() as session:  # type: ignore[attr-defined]
        return int(
            session.scalar(
                select(func.count(Instance.id))
                .join(Series, Instance.series_id == Series.id)
                .where(Series.series_instance_uid == pseudonym, Instance.state == "stored")
            )
            or 0
        )


def test_find_studies_by_patient_by_uid_and_nothing(source: PacsSource, study: PacsStudy):
    assert source.find_studies({"PatientID": study.patient_id}) == [study.study_uid]
    assert source.find_studies({"StudyInstanceUID": study.study_uid}) == [study.study_uid]
    assert source.find_studies({"PatientID": study.patient_id[:-2] + "*"}) == [study.study_uid]
    assert source.find_studies({"PatientID": "NOBODY-" + secrets.token_hex(4)}) == []


def test_find_series_of_a_study_with_and_without_series_keys(source: PacsSource, study: PacsStudy):
    assert sorted(source.find_series(study.study_uid, {})) == sorted(study.series)
    first = next(iter(study.series))
    assert source.find_series(study.study_uid, {"SeriesInstanceUID": first}) == [first]
    assert source.find_series(study.study_uid, {"Modality": "CT"}) == []
    assert source.find_series("1.2.826.0.1.3680043.8.498.1", {}) == []


def test_retrieve_series_stores_every_instance_with_its_pixels_and_again_is_idempotent(
    source: PacsSource, study: PacsStudy, ingest_service: IngestService
):
    sink = CatalogueSink(ingest_service.ctx)  # type: ignore[arg-type]
    series_uid, sop_uids = next(iter(study.series.items()))
    transfer = source.retrieve_series(study.study_uid, series_uid, sink)
    assert (transfer.stored, transfer.failed, transfer.note) == (len(sop_uids), 0, None)
    assert sink.present(sop_uids) == set(sop_uids)
    assert stored_in_series(ingest_service, series_uid) == len(sop_uids) == 12
    ctx = ingest_service.ctx
    with ctx.session_factory() as session:  # type: ignore[attr-defined]
        key = session.scalar(
            select(Instance.object_key).where(
                Instance.sop_instance_uid == ctx.deidentifier.pseudonymise_uid(sop_uids[3])  # type: ignore[attr-defined]
            )
        )
    stored = pydicom.dcmread(io.BytesIO(ctx.store.get_bytes(key)))  # type: ignore[attr-defined]
    original = pydicom.dcmread(io.BytesIO(study.files[sop_uids[3]]))
    assert (stored.pixel_array == original.pixel_array).all()
    assert stored.PatientID.startswith("VF-") and stored.PatientID != study.patient_id
    again = source.retrieve_series(study.study_uid, series_uid, sink)
    assert (again.stored, again.failed) == (len(sop_uids), 0)
    assert stored_in_series(ingest_service, series_uid) == len(sop_uids)


def test_an_instance_voxelflow_refuses_costs_only_itself(
    kind: str, source: PacsSource, orthanc, shared_data: Path, ingest_service: IngestService
):
    """A text SR inside an image series: Orthanc stores it, voxelflow refuses it (not an image). Orthanc ends
    a C-MOVE at its first failed sub-operation; the rest must arrive all the same."""
    files = sorted((shared_data / TCIA / "Study3" / "11_HCropVolume").iterdir())[:6]
    report = pydicom.dcmread(files[0])
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    encoded = io.BytesIO()
    report.save_as(encoded, enforce_file_format=True)
    study = upload_fresh_study(orthanc, [files], secrets.token_hex(4), extra=[encoded.getvalue()])
    series_uid, sop_uids = next(iter(study.series.items()))
    sink = CatalogueSink(ingest_service.ctx)  # type: ignore[arg-type]
    transfer = source.retrieve_series(study.study_uid, series_uid, sink)
    assert (transfer.stored, transfer.failed) == (6, 1)
    assert transfer.note
    assert sink.present(sop_uids) == set(sop_uids[:6])


@pytest.mark.parametrize("kind", KINDS)
def test_a_pacs_that_is_not_there_is_unavailable(kind: str, orthanc, ingest_service: IngestService):
    from tests.service_harness import free_port

    closed = free_port()
    url = f"http://127.0.0.1:{closed}/dicom-web" if kind == "dicomweb" else f"dimse://ORTHANC@127.0.0.1:{closed}"
    source = open_source(connection(kind, orthanc, url=url, timeout_seconds=5), ingest_service.ctx.settings)  # type: ignore[attr-defined]
    with pytest.raises(PacsUnavailableError, match=rf"127\.0\.0\.1:{closed}"):
        source.find_studies({"PatientID": "X"})


@pytest.mark.parametrize("kind", KINDS)
def test_a_pacs_that_never_answers_is_given_up_after_the_timeout(
    kind: str, orthanc, silent_peer: int, ingest_service: IngestService
):
    url = (
        f"http://127.0.0.1:{silent_peer}/dicom-web" if kind == "dicomweb" else f"dimse://SILENT@127.0.0.1:{silent_peer}"
    )
    source = open_source(connection(kind, orthanc, url=url, timeout_seconds=2), ingest_service.ctx.settings)  # type: ignore[attr-defined]
    started = time.monotonic()
    with pytest.raises(PacsUnavailableError):
        source.find_studies({"PatientID": "X"})
    assert 1.5 < time.monotonic() - started < 15


def test_pull_queries_take_only_keys_every_pacs_matches():
    assert split_query({"PatientID": "P", "00080060": "MR", "StudyDate": "20200101-"}) == (
        {"PatientID": "P", "StudyDate": "20200101-"},
        {"Modality": "MR"},
    )
    with pytest.raises(PullQueryError, match="not a pull matching key"):
        split_query({"InstanceNumber": "1"})
    with pytest.raises(PullQueryError, match="unknown attribute"):
        split_query({"NoSuchKeyword": "1"})


@pytest.mark.parametrize(
    "url",
    ["ftp://pacs/x", "dimse://pacs:104", "dimse://AET@pacs", "dimse://THIS_AE_TITLE_IS_TOO_LONG@pacs:104"],
)
def test_a_pacs_url_must_name_its_protocol_and_peer(url: str):
    with pytest.raises(ValueError, match="PACS URL"):
        PacsConnection(url=url)
