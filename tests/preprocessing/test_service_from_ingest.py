# ruff: noqa: F811  (fixtures imported from other modules are re-bound as arguments)
"""Ingest → preprocessing through both real Celery workers: a series STOWed to ingest is reconstructed,
announced on the ``preprocessing`` queue, and recorded by the preprocessing worker as a catalogue case
(pseudonymised patient, the ingesting site, the reconstructed volume stored content-addressed)."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

from tests.ingest.conftest import (  # noqa: F401  (fixtures)
    IngestService,
    ingest_env,
    ingest_service,
    ingest_worker,
    stow,
)
from tests.preprocessing.service_fixtures import (  # noqa: F401  (fixtures)
    PreprocessingService,
    preprocessing_env,
    preprocessing_service,
    preprocessing_worker,
)
from tests.service_harness import wait_for


def test_stowed_series_becomes_a_catalogue_case(
    ingest_service: IngestService,
    ingest_worker: object,
    preprocessing_service: PreprocessingService,
    preprocessing_worker: object,
    shared_data: Path,
) -> None:
    files = sorted((shared_data / "tcia_brain_tumor_progression_mr" / "Study3" / "11_HCropVolume").iterdir())
    with ingest_service.client("pacs") as client:
        assert stow(client, [f.read_bytes() for f in files]).status_code == 200
    original = pydicom.dcmread(files[0])
    with ingest_service.client("pacs") as client:  # the sender may search by the original PatientID
        studies = client.get("/dicomweb/studies", params={"PatientID": original.PatientID}).json()
        pseudonym = studies[0]["00100020"]["Value"][0]
        # the patient's other series may be in the catalogue too (other tests pull the whole study): find the
        # pseudonymised UID of this series by its number
        series_uid = next(
            s["0020000E"]["Value"][0]
            for study in studies
            for s in client.get(f"/dicomweb/studies/{study['0020000D']['Value'][0]}/series").json()
            if s.get("00200011", {}).get("Value", [None])[0] == original.SeriesNumber
        )
    assert pseudonym != original.PatientID

    def catalogue_case() -> dict[str, object] | None:
        with preprocessing_service.client() as client:
            page = client.get("/cases", params={"collection": "catalogue", "limit": 1000}).json()
        return next((c for c in page["cases"] if c["case_id"] == series_uid), None)

    case = wait_for(catalogue_case, timeout=90, what="the preprocessing worker to record the series")
    assert case["patient"] == pseudonym and case["site"] == "test-site" and case["modality"] == "MR"
    assert case["label_key"] is None and series_uid != original.SeriesInstanceUID  # pseudonymised, never original
    # the case image is the reconstructed volume: 50x34 matrix, 40 slices at 1 mm, same voxels as the DICOM
    store = preprocessing_service.ctx.store  # type: ignore[attr-defined]
    data = store.get_bytes(case["image_key"])
    image = nib.Nifti1Image.from_bytes(gzip.decompress(data))
    assert image.shape == (34, 50, 40)
    assert np.allclose(image.header.get_zooms()[:3], (1.0, 1.0, 1.0))
    pixels = sorted(int(pydicom.dcmread(f).pixel_array.sum()) for f in files)
    assert sorted(int(image.get_fdata()[:, :, k].sum()) for k in range(40)) == pixels
