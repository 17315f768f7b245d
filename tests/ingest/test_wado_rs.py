"""WADO-RS frames, pixel bulk data, rendered images and thumbnails, transfer syntax by Accept, and QIDO
fuzzy matching, on real files (the bundled MR and enhanced multi-frame MR; a JPEG 2000 copy made with
pydicom, a 12-bit JPEG Extended copy made with dcmtk), cross-checked against Orthanc's own DICOMweb answers
for the same instances. Pixel data no installed decoder reads is stored, its series flagged, and every
representation that needs decoding refused with a 406 that says why; never a 5xx.
"""

from __future__ import annotations

import copy
import io
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import MPEG2MPML, JPEG2000Lossless, generate_uid
from python_multipart.multipart import parse_options_header

from tests.ingest.conftest import IngestService, stow
from tests.service_harness import wait_for

TCIA = "tcia_brain_tumor_progression_mr"
ELE = "1.2.840.10008.1.2.1"
JPEG12 = "1.2.840.10008.1.2.4.51"


@dataclass
class Published:
    """One real instance under fresh UIDs, stored in voxelflow (and in Orthanc where ``in_orthanc``)."""

    dataset: pydicom.Dataset  # as sent
    in_orthanc: bool

    @property
    def path(self) -> str:
        ds = self.dataset
        return f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"


def fresh(dataset: pydicom.Dataset, study_uid: str, patient_id: str) -> pydicom.Dataset:
    dataset = copy.deepcopy(dataset)
    dataset.PatientID, dataset.StudyInstanceUID, dataset.SeriesInstanceUID = patient_id, study_uid, generate_uid()
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return dataset


def encoded(dataset: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def multipart(response: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    """(headers, payload) of each part of a multipart/related response."""
    assert response.status_code == 200, response.text
    _, params = parse_options_header(response.headers["content-type"])
    boundary = params[b"boundary"]
    out = []
    for chunk in response.content.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, body = chunk.lstrip(b"\r\n").partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        out.append((headers, body[:-2] if body.endswith(b"\r\n") else body))
    return out


def dcmtk_jpeg12(source: Path, target: Path) -> pydicom.Dataset:
    """A real MR slice as 12-bit JPEG Extended (process 4), encoded by dcmtk's dcmcjpeg."""
    if shutil.which("dcmcjpeg") is None:
        pytest.skip("dcmtk is installed by ci/install-system.sh")
    subprocess.run(["dcmcjpeg", "+ee", str(source), str(target)], check=True, capture_output=True, timeout=60)
    dataset = pydicom.dcmread(target)
    assert str(dataset.file_meta.TransferSyntaxUID) == JPEG12 and dataset.BitsStored == 12
    return dataset


@pytest.fixture(scope="module")
def published(
    ingest_service: IngestService, orthanc, shared_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Published]:
    patient = f"VF-WADO-{generate_uid()[-6:]}"
    study, other_study = generate_uid(), generate_uid()
    t1 = pydicom.dcmread(sorted((shared_data / TCIA / "Study1" / "12-T1post-05670").iterdir())[0])
    crop = pydicom.dcmread(sorted((shared_data / TCIA / "Study2" / "14_HCropVolume").iterdir())[0])
    fmri = pydicom.dcmread(shared_data / "enhanced_multiframe_mr" / "siemens_xa10_fmri" / "dicom" / "6_1.dcm")
    j2k = fresh(crop, study, patient)
    j2k.compress(JPEG2000Lossless, generate_instance_uid=False)
    source = tmp_path_factory.mktemp("jpeg12") / "t1.dcm"
    t1.save_as(source)
    jpeg12 = dcmtk_jpeg12(source, source.with_name("t1-jpeg12.dcm"))
    mpeg = fresh(crop, other_study, patient)
    mpeg.file_meta.TransferSyntaxUID = MPEG2MPML  # a video stream: nothing here decodes it
    mpeg.PixelData = encapsulate([bytes(64)])
    mpeg["PixelData"].VR = "OB"
    items = {
        "mr": Published(fresh(t1, study, patient), True),
        "j2k": Published(j2k, True),
        "multiframe": Published(fresh(fmri, study, patient), True),
        "jpeg12": Published(fresh(jpeg12, study, patient), False),
        "mpeg": Published(mpeg, False),
    }
    with ingest_service.client("pacs") as client, httpx.Client(base_url=orthanc.url, timeout=60) as pacs:
        for item in items.values():
            data = encoded(item.dataset)
            response = stow(client, [data])
            assert response.status_code == 200, response.text
            if item.in_orthanc:
                assert pacs.post("/instances", content=data).status_code == 200
    return items


def test_frames_default_to_native_little_endian_like_orthancs(
    published: dict[str, Published], ingest_service: IngestService, orthanc
):
    with ingest_service.client("researcher") as client, httpx.Client(base_url=orthanc.url, timeout=60) as pacs:
        for name in ("mr", "j2k", "multiframe"):
            item = published[name]
            response = client.get(f"/dicomweb{item.path}/frames/1")
            [(headers, payload)] = multipart(response)
            assert headers["content-type"] == f"application/octet-stream; transfer-syntax={ELE}"
            first = item.dataset.pixel_array if name != "multiframe" else item.dataset.pixel_array[0]
            assert payload == first.astype(first.dtype.newbyteorder("<")).tobytes()
            if name != "j2k":  # Orthanc 1.10 (Debian) cannot decode this JPEG 2000: it answers a 500
                [(_, theirs)] = multipart(pacs.get(f"/dicom-web{item.path}/frames/1"))
                assert payload == theirs  # Orthanc's DICOMweb answer for the same instance


def test_frames_as_stored_transcoded_or_refused_with_a_reason(
    published: dict[str, Published], ingest_service: IngestService, orthanc
):
    item = published["j2k"]
    (codestream,) = generate_frames(item.dataset.PixelData, number_of_frames=1)
    stored_form = {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}
    with ingest_service.client("researcher") as client, httpx.Client(base_url=orthanc.url, timeout=60) as pacs:
        stored = client.get(f"/dicomweb{item.path}/frames/1", headers=stored_form)
        [(headers, payload)] = multipart(stored)
        assert headers["content-type"] == f"image/jp2; transfer-syntax={JPEG2000Lossless}"
        assert payload == codestream
        [(_, theirs)] = multipart(pacs.get(f"/dicom-web{item.path}/frames/1", headers=stored_form))
        assert payload == theirs
        jls = client.get(f"/dicomweb{item.path}/frames/1", headers={"Accept": 'multipart/related; type="image/jls"'})
        [(headers, payload)] = multipart(jls)
        assert headers["content-type"] == "image/jls; transfer-syntax=1.2.840.10008.1.2.4.80"
        as_jls = copy.deepcopy(item.dataset)  # the codestream decoded as the instance's pixel data
        as_jls.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.80"
        as_jls.PixelData = encapsulate([payload])
        assert (as_jls.pixel_array == item.dataset.pixel_array).all()
        lossy = client.get(f"/dicomweb{item.path}/frames/1", headers={"Accept": 'multipart/related; type="image/jpeg"'})
        assert lossy.status_code == 406 and "lossy" in lossy.json()["detail"]
        assert "transfer-syntax=*" in lossy.json()["detail"]
        wrong = client.get(
            f"/dicomweb{item.path}/frames/1",
            headers={"Accept": f'multipart/related; type="image/jp2"; transfer-syntax={ELE}'},
        )
        assert wrong.status_code == 406 and "cannot carry" in wrong.json()["detail"]


def test_frame_lists_of_a_multiframe_instance(published: dict[str, Published], ingest_service: IngestService):
    item = published["multiframe"]
    frames = item.dataset.pixel_array  # (6, 64, 64)
    with ingest_service.client("researcher") as client:
        response = client.get(f"/dicomweb{item.path}/frames/1,3,6")
        payloads = [p for _, p in multipart(response)]
        assert [np.frombuffer(p, "<u2").reshape(64, 64).tolist() for p in payloads] == [
            frames[i].tolist() for i in (0, 2, 5)
        ]
        assert client.get(f"/dicomweb{item.path}/frames/7").status_code == 404
        assert client.get(f"/dicomweb{item.path}/frames/0").status_code == 400
        assert client.get(f"/dicomweb{item.path}/frames/1,x").status_code == 400
        rendered = client.get(f"/dicomweb{item.path}/frames/3/rendered", headers={"Accept": "image/png"})
        assert rendered.status_code == 200 and Image.open(io.BytesIO(rendered.content)).size == (64, 64)
        assert client.get(f"/dicomweb{item.path}/frames/7/rendered").status_code == 404


def test_instances_in_the_transfer_syntax_asked_for(published: dict[str, Published], ingest_service: IngestService):
    mr, j2k = published["mr"], published["j2k"]
    with ingest_service.client("researcher") as client:
        jls = client.get(
            f"/dicomweb{mr.path}",
            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.80'},
        )
        [(headers, payload)] = multipart(jls)
        assert headers["content-type"] == "application/dicom; transfer-syntax=1.2.840.10008.1.2.4.80"
        transcoded = pydicom.dcmread(io.BytesIO(payload))
        assert str(transcoded.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.80"
        assert (transcoded.pixel_array == mr.dataset.pixel_array).all()
        pseudonym = ingest_service.ctx.deidentifier.pseudonymise_uid(str(mr.dataset.SOPInstanceUID))  # type: ignore[attr-defined]
        assert transcoded.SOPInstanceUID == pseudonym  # a lossless transcode is the same instance
        [(headers, payload)] = multipart(client.get(f"/dicomweb{j2k.path}"))  # PS3.18 default: decompressed
        assert headers["content-type"] == f"application/dicom; transfer-syntax={ELE}"
        assert (pydicom.dcmread(io.BytesIO(payload)).pixel_array == j2k.dataset.pixel_array).all()
        as_stored = client.get(
            f"/dicomweb{j2k.path}", headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
        )
        [(headers, payload)] = multipart(as_stored)
        assert pydicom.dcmread(io.BytesIO(payload)).file_meta.TransferSyntaxUID == JPEG2000Lossless
        preferred = client.get(  # the first range that can be served wins
            f"/dicomweb{j2k.path}",
            headers={
                "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50, '
                'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.5;q=0.5'
            },
        )
        [(headers, _)] = multipart(preferred)
        assert headers["content-type"] == "application/dicom; transfer-syntax=1.2.840.10008.1.2.5"
        assert client.get(f"/dicomweb{j2k.path}", headers={"Accept": "image/png"}).status_code == 406


def test_metadata_has_the_pixel_data_bulkdata_uri_orthanc_has(
    published: dict[str, Published], ingest_service: IngestService, orthanc
):
    item = published["mr"]
    with ingest_service.client("researcher") as client, httpx.Client(base_url=orthanc.url, timeout=60) as pacs:
        [ours] = client.get(f"/dicomweb{item.path}/metadata").json()
        [theirs] = pacs.get(f"/dicom-web{item.path}/metadata").json()
        assert ours["7FE00010"]["vr"] == theirs["7FE00010"]["vr"] == "OW"
        assert "BulkDataURI" in theirs["7FE00010"] and "Value" not in ours["7FE00010"]
        for tag in ("00080016", "00080060", "00280010", "00280011", "00280100", "00280101", "00280030", "00200037"):
            assert ours[tag] == theirs[tag], tag
        bulk = client.get(ours["7FE00010"]["BulkDataURI"].removeprefix(ingest_service.url))
        [(headers, payload)] = multipart(bulk)
        assert payload == item.dataset.PixelData and headers["content-type"].startswith("application/octet-stream")
        j2k_uri = client.get(f"/dicomweb{published['j2k'].path}/metadata").json()[0]["7FE00010"]
        assert j2k_uri["vr"] == "OB"
        assert client.get(f"/dicomweb{item.path}/bulkdata/00100010").status_code == 404


def test_rendered_with_the_instances_window_or_the_querys(
    published: dict[str, Published], ingest_service: IngestService
):
    item = published["mr"]
    pixels = item.dataset.pixel_array.astype(float)  # no rescale in this MR
    center, width = float(item.dataset.WindowCenter), float(item.dataset.WindowWidth)

    def linear(c: float, w: float) -> np.ndarray:  # PS3.3 C.11.2.1.2.1
        return np.clip(np.rint(((pixels - (c - 0.5)) / (w - 1) + 0.5) * 255), 0, 255).astype(np.uint8)

    with ingest_service.client("researcher") as client:
        png = client.get(f"/dicomweb{item.path}/rendered", headers={"Accept": "image/png"})
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert (np.asarray(Image.open(io.BytesIO(png.content))) == linear(center, width)).all()
        narrow = client.get(
            f"/dicomweb{item.path}/rendered", params={"window": "300,200,linear"}, headers={"Accept": "image/png"}
        )
        assert (np.asarray(Image.open(io.BytesIO(narrow.content))) == linear(300, 200)).all()
        jpeg = client.get(f"/dicomweb{item.path}/rendered", params={"viewport": "128,64", "quality": "70"})
        assert jpeg.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(jpeg.content)).size == (64, 64)
        for params in ({"quality": "0"}, {"window": "10"}, {"window": "1,2,cubic"}, {"viewport": "0,10"}):
            assert client.get(f"/dicomweb{item.path}/rendered", params=params).status_code == 400, params
        assert client.get(f"/dicomweb{item.path}/rendered", headers={"Accept": "image/gif"}).status_code == 406
        assert client.get(f"/dicomweb{item.path}/frames/2/rendered").status_code == 404
        for path in (item.path, item.path.rsplit("/instances/", 1)[0], item.path.split("/series/")[0]):
            thumbnail = client.get(f"/dicomweb{path}/thumbnail")
            assert thumbnail.status_code == 200, path
            assert max(Image.open(io.BytesIO(thumbnail.content)).size) <= 128


def test_undecodable_pixel_data_is_stored_flagged_and_refused_with_a_reason(
    published: dict[str, Published], ingest_service: IngestService, ingest_worker: object
):
    """Issue 13: 12-bit JPEG Extended has decoders registered (GDCM, Pillow) that refuse 12-bit samples;
    MPEG-2 has none. Both are stored as sent and their series flagged; what needs decoding is a 406."""
    as_stored = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    with ingest_service.client("researcher") as client:
        for name, why in (("jpeg12", "12-bit"), ("mpeg", "MPEG2")):
            item = published[name]
            series_uid = str(item.dataset.SeriesInstanceUID)
            status = wait_for(
                lambda: (s := client.get(f"/series/{series_uid}").json()).get("status") == "flagged" and s,  # noqa: B023
                what=f"the {name} series to be flagged",
            )
            assert status["non_volumetric_reason"].startswith("undecodable_pixel_data") and why in str(status)
            for path in (item.path, f"{item.path}/frames/1", f"{item.path}/rendered", f"{item.path}/thumbnail"):
                refused = client.get(f"/dicomweb{path}")
                assert refused.status_code == 406, (path, refused.text)
                assert "transfer-syntax=*" in refused.json()["detail"]
            [(headers, payload)] = multipart(client.get(f"/dicomweb{item.path}", headers=as_stored))
            assert (
                pydicom.dcmread(io.BytesIO(payload)).file_meta.TransferSyntaxUID
                == item.dataset.file_meta.TransferSyntaxUID
            )
            assert client.get(f"/dicomweb{item.path}/metadata").status_code == 200
        jpeg12 = published["jpeg12"]
        frames = client.get(
            f"/dicomweb{jpeg12.path}/frames/1",
            headers={"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'},
        )
        [(headers, payload)] = multipart(frames)
        assert headers["content-type"] == f"image/jpeg; transfer-syntax={JPEG12}"
        assert payload == next(generate_frames(jpeg12.dataset.PixelData, number_of_frames=1))
        # the study holds it beside decodable instances: each part says the transfer syntax it is in
        study = client.get(f"/dicomweb/studies/{jpeg12.dataset.StudyInstanceUID}")
        syntaxes = sorted(h["content-type"].rsplit("=", 1)[1] for h, _ in multipart(study))
        assert syntaxes == sorted([ELE, ELE, ELE, JPEG12])


def test_qido_fuzzy_matching_of_patient_names(published: dict[str, Published], ingest_service: IngestService):
    patient = str(published["mr"].dataset.PatientID)
    pseudonym = ingest_service.ctx.deidentifier.pseudonymise_patient_id(patient)  # type: ignore[attr-defined]
    with ingest_service.client("researcher") as client:
        fuzzy = client.get("/dicomweb/studies", params={"PatientName": pseudonym[:8].lower(), "fuzzymatching": "true"})
        assert fuzzy.status_code == 200 and pseudonym in fuzzy.text
        literal = client.get("/dicomweb/studies", params={"PatientName": pseudonym[:8].lower()})
        assert literal.status_code == 204
        assert (
            client.get("/dicomweb/studies", params={"PatientName": pseudonym, "fuzzymatching": "false"}).status_code
            == 200
        )
        assert client.get("/dicomweb/studies", params={"fuzzymatching": "maybe"}).status_code == 400
