"""PACS round trip on a real Orthanc: segment a DICOMweb series, STOW the DICOM SEG back, read it from Orthanc.

The SEG's geometry is checked independently of the code that wrote it: highdicom reads the SEG's own plane
positions into a volume, which must equal the NIfTI mask (served by the API) voxel for voxel in world
coordinates; each frame must reference the source instance whose ImagePositionPatient it carries.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicomweb_client import DICOMwebClient

from tests.inference.conftest import InferenceService, running_service
from tests.inference.served_models import MovableAliases


@pytest.fixture(scope="module")
def service(base_settings: dict[str, Any], pacs_series: dict[str, Any]) -> Iterator[InferenceService]:
    settings = {**base_settings, "pacs_url": pacs_series["root"]}
    with running_service(settings, MovableAliases({"champion": "3"})) as svc:
        yield svc


def test_segment_dicomweb_series_and_send_seg_to_orthanc(service: InferenceService, pacs_series: dict[str, Any]):
    url = f"{pacs_series['root']}/studies/{pacs_series['study']}/series/{pacs_series['series']}"
    with service.client() as client:
        response = client.post("/v1/segmentations", json={"dicomweb_series_url": url, "send_to_pacs": True})
        assert response.status_code == 200, response.text
        body = response.json()
        mask_image = nib.Nifti1Image.from_bytes(gzip.decompress(client.get(body["mask_nifti_uri"]).content))
        seg_download = client.get(body["dicom_seg_uri"])
    assert body["status"] == "succeeded" and body["pacs_status"] == "sent"
    assert seg_download.headers["content-type"] == "application/dicom"

    dicomweb = DICOMwebClient(pacs_series["root"])
    found = dicomweb.search_for_series(pacs_series["study"], search_filters={"Modality": "SEG"})
    assert len(found) == 1
    seg_series = pydicom.Dataset.from_json(found[0]).SeriesInstanceUID
    instances = dicomweb.retrieve_series(pacs_series["study"], seg_series)
    assert len(instances) == 1
    seg = hd.seg.Segmentation.from_dataset(instances[0])

    # references the right series, and the algorithm carries model name, version and registry URI
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pacs_series["series"]
    algorithm = seg.SegmentSequence[-1].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("hippocampus-test", "3")
    assert "models:/hippocampus-test/3" in algorithm.AlgorithmParameters
    assert [s.SegmentLabel for s in seg.SegmentSequence if s.SegmentNumber] == ["anterior", "posterior"]
    # the SR went with it, into the same study
    reports = dicomweb.search_for_series(pacs_series["study"], search_filters={"Modality": "SR"})
    assert len(reports) >= 1

    # every frame references the source instance at its own position
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(position, pacs_series["positions"][source_uid])

    # the SEG's frames, placed by highdicom from their own geometry, equal the NIfTI mask in world space
    volume = seg.get_volume(combine_segments=True, relabel=True).permute_spatial_axes([2, 1, 0])
    seg_affine = volume.get_affine("RAS")
    mask = np.asarray(mask_image.dataobj)
    assert volume.spatial_shape == mask.shape
    assert np.allclose(seg_affine, mask_image.affine, atol=1e-4)
    assert np.array_equal(volume.array.astype(np.uint8), mask)
    assert len(np.unique(mask)) > 1  # a non-trivial mask, so a shifted slice could not pass
