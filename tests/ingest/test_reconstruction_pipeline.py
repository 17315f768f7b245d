"""Series -> volume through the ingest path (STOW -> de-identification -> S3 -> worker -> catalogue).

The reconstruction itself is tested on files (test_reconstruction_dcm2niix.py); here what only the
running service can show: that de-identification keeps what a mosaic needs, that a 4-D diffusion
volume and its FSL sidecars land in object storage under the contract's keys, and that a gap is
reported with where it is.
"""

from __future__ import annotations

import gzip
import io
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from services.ingest.volume import reconstruct_series
from shared.contracts import layout
from tests.ingest import dicom_cases as cases
from tests.ingest.conftest import IngestService, stow
from tests.service_harness import wait_for


def _series_status(service: IngestService, series_uid: str) -> dict:
    with service.client("researcher") as client:
        response = client.get(f"/series/{series_uid}")
        return response.json() if response.status_code == 200 else {}


def _finished(service: IngestService, series_uid: str) -> dict:
    return wait_for(
        lambda: (s := _series_status(service, series_uid)).get("status") in ("volume", "flagged") and s,
        what=f"series {series_uid} to be finalised",
    )


def test_siemens_mosaic_dwi_becomes_a_4d_volume_with_bval_bvec(
    ingest_service: IngestService, ingest_worker: object, tmp_path: Path
) -> None:
    files, _ = cases.siemens_mosaic_dwi(tmp_path / "dicom")
    series_uid = generate_uid()  # the nibabel headers are shared by every run: a fresh series each time
    payloads = []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        payloads.append(buffer.getvalue())
    with ingest_service.client("pacs") as client:
        assert stow(client, payloads).status_code == 200
    status = _finished(ingest_service, series_uid)
    assert status["status"] == "volume", status["non_volumetric_reason"]

    (entry,) = status["volumes"]
    assert entry["shape"] == [128, 128, 48, 3] and entry["frames"] == 3 and entry["frame_axis"] == "diffusion"
    assert entry["metadata"] == {"mosaic": "siemens", "frame_axis": "diffusion"}
    assert entry["b_values"] == [0.0, 1000.0, 1000.0]
    pseudonymised = status["series_instance_uid"]
    generation = int(entry["key"].split("/")[2][1:])
    assert entry["key"] == layout.volume_key(pseudonymised, generation, "volume")
    assert entry["bval_key"] == layout.volume_bval_key(pseudonymised, generation, "volume")

    store = ingest_service.ctx.store  # type: ignore[attr-defined]
    stored = nib.Nifti1Image.from_bytes(gzip.decompress(store.get_bytes(entry["key"])))
    (expected,) = reconstruct_series(files)  # the original files, before de-identification
    np.testing.assert_array_equal(np.asarray(stored.dataobj), expected.array)
    np.testing.assert_allclose(stored.affine, expected.affine, atol=1e-4)
    bvals = np.loadtxt(io.BytesIO(store.get_bytes(entry["bval_key"])))
    bvecs = np.loadtxt(io.BytesIO(store.get_bytes(entry["bvec_key"])))
    np.testing.assert_allclose(bvals, [0.0, 1000.0, 1000.0])
    np.testing.assert_allclose(bvecs, expected.fsl_bvecs(), atol=1e-6)


def test_gap_is_flagged_with_where_it_is(
    ingest_service: IngestService, ingest_worker: object, shared_data: Path
) -> None:
    (folder,) = (shared_data / "tcia_brain_tumor_progression_mr" / "Study3").glob("*FLAIRreg*")
    files = sorted(folder.iterdir(), key=lambda f: int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber))
    series_uid = generate_uid()
    payloads = []
    for path in files[:8] + files[9:]:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        payloads.append(buffer.getvalue())
    with ingest_service.client("pacs") as client:
        assert stow(client, payloads).status_code == 200
    status = _finished(ingest_service, series_uid)
    assert status["status"] == "flagged" and status["volumes"] == []
    reason = status["non_volumetric_reason"]
    assert reason.startswith("missing_slices: 1 gap(s)") and "1 slice(s) missing between" in reason
    missing = pydicom.dcmread(files[8], stop_before_pixels=True)
    row, column = np.reshape(np.asarray(missing.ImageOrientationPatient, dtype=float), (2, 3))
    where = float(np.asarray(missing.ImagePositionPatient, dtype=float) @ np.cross(row, column))
    (said,) = re.findall(r"at (-?[0-9.]+)\)", reason)
    assert float(said) == pytest.approx(where, abs=0.02)  # the missing slice's position along the normal
