"""DICOM SEG and SR of one request, checked by readers that are not highdicom: dcmqi reads the SEG back to
the mask (in world coordinates), dciodvfy finds no IOD error in SEG and SR, and the SR's volumes are the mask's
voxel counts times the voxel volume. No server needed: the source is the real TCIA HippoCrop series."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from services.inference.destinations import (
    CStoreDestination,
    StowDestination,
    destination_for,
    presentation_contexts,
)
from services.inference.dicom_seg import AlgorithmInfo, build_dicom_seg
from services.inference.dicom_sr import build_measurement_report, structure_volumes_ml, voxel_volume_mm3
from services.inference.sources import SourceVolume, volume_from_datasets
from tests.inference.dicom_readers import dcmqi_label_map, iod_errors, same_label_map_in_world

HIPPO_CROP = "tcia_brain_tumor_progression_mr/Study1/13_HCropVolume"
LABELS = {0: "background", 1: "anterior", 2: "posterior"}
ALGORITHM = AlgorithmInfo("hippocampus-test", "7", "models:/hippocampus-test/7", "req-outputs", "hippo-v3", "0123abcd")


@pytest.fixture(scope="module")
def source(shared_data: Path) -> SourceVolume:
    files = sorted((shared_data / HIPPO_CROP).glob("*.dcm"))
    return volume_from_datasets([pydicom.dcmread(f) for f in files])


@pytest.fixture(scope="module")
def mask(source: SourceVolume) -> np.ndarray:
    """Two blobs thresholded from the image itself: irregular, asymmetric along every axis."""
    image = np.asarray(source.array, dtype=float).reshape(source.array.shape[:3])
    mask = np.zeros(image.shape, dtype=np.uint8)
    high = image > np.percentile(image, 80)
    middle = image.shape[0] // 2
    mask[:middle][high[:middle]] = 1
    mask[middle:][high[middle:]] = 2
    assert set(np.unique(mask)) == {0, 1, 2}
    return mask


def save(dataset: pydicom.Dataset, path: Path) -> Path:
    dataset.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("labelmap", [True, False], ids=["labelmap", "binary"])
def test_seg_reads_back_through_dcmqi_and_has_no_iod_error(source, mask, labelmap, tmp_path):
    seg = build_dicom_seg(mask, source.affine, source.datasets, LABELS, ALGORITHM, labelmap=labelmap)
    path = save(seg, tmp_path / "seg.dcm")
    assert seg.SegmentationType == ("LABELMAP" if labelmap else "BINARY")
    assert iod_errors(path) == []
    read_back = dcmqi_label_map(path, tmp_path)
    assert same_label_map_in_world(read_back, nib.Nifti1Image(mask, source.affine))
    # a shifted mask would not pass: the check can fail
    assert not same_label_map_in_world(read_back, nib.Nifti1Image(np.roll(mask, 1, axis=2), source.affine))


def test_seg_carries_the_provenance(source, mask):
    seg = build_dicom_seg(mask, source.affine, source.datasets, LABELS, ALGORITHM)
    structures = [s for s in seg.SegmentSequence if s.SegmentNumber]
    assert [s.SegmentLabel for s in structures] == ["anterior", "posterior"]
    algorithm = structures[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("hippocampus-test", "7")
    for value in ("models:/hippocampus-test/7", "hippo-v3", "0123abcd", "req-outputs"):
        assert value in algorithm.AlgorithmParameters
    assert list(seg.SoftwareVersions) == ["hippocampus-test 7", "voxelflow 0123abcd"]
    assert seg.ContentDescription == "request req-outputs"
    assert seg.SeriesDescription == "AI segmentation hippocampus-test v7"


@pytest.mark.parametrize("labelmap", [True, False], ids=["labelmap", "binary"])
def test_sr_volumes_references_and_no_iod_error(source, mask, labelmap, tmp_path):
    seg = build_dicom_seg(mask, source.affine, source.datasets, LABELS, ALGORITHM, labelmap=labelmap)
    volumes = structure_volumes_ml(mask, source.affine, [1, 2])
    sr = build_measurement_report(seg, source.datasets, {"anterior": volumes[1], "posterior": volumes[2]}, ALGORITHM)
    path = save(sr, tmp_path / "sr.dcm")
    assert iod_errors(path, references_labelmap_seg=labelmap) == []

    report = hd.sr.srread(path)
    groups = report.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    voxel_ml = voxel_volume_mm3(source.affine) / 1000
    for group, (number, value) in zip(groups, [(1, 1), (2, 2)], strict=True):
        (reference,) = [  # the Referenced Segment content item (121191, DCM)
            item.ReferencedSOPSequence[0] for item in group[0].ContentSequence if item.ValueType == "IMAGE"
        ]
        assert reference.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert int(reference.ReferencedSegmentNumber) == number
        (measurement,) = group.get_measurements(name=hd.sr.CodedConcept("118565006", "SCT", "Volume"))
        assert measurement.unit.value == "ml"
        assert measurement.value == pytest.approx(int((mask == value).sum()) * voxel_ml, abs=1e-6)
    # the source series and the SEG are the SR's evidence
    evidence = {
        item.SeriesInstanceUID: {i.ReferencedSOPInstanceUID for i in item.ReferencedSOPSequence}
        for study in report.CurrentRequestedProcedureEvidenceSequence
        for item in study.ReferencedSeriesSequence
    }
    assert evidence[source.datasets[0].SeriesInstanceUID] == {ds.SOPInstanceUID for ds in source.datasets}
    assert evidence[seg.SeriesInstanceUID] == {seg.SOPInstanceUID}
    assert "0123abcd" in " ".join(report.SoftwareVersions)


def test_structure_volume_is_count_times_voxel_volume():
    affine = np.diag([-0.5, -0.7, 2.0, 1.0])
    mask = np.zeros((4, 5, 6), dtype=np.uint8)
    mask[:2, :3, :1] = 1  # 6 voxels
    mask[3, 4, :] = 2  # 6 voxels
    volumes = structure_volumes_ml(mask, affine, [1, 2, 3])
    assert volumes == pytest.approx({1: 6 * 0.7 / 1000, 2: 6 * 0.7 / 1000, 3: 0.0})


def test_destination_chosen_by_scheme():
    assert isinstance(destination_for("http://pacs:8042/dicom-web"), StowDestination)
    dimse = destination_for("dicom://ORTHANC@127.0.0.1:4242", calling_aet="ME")
    assert isinstance(dimse, CStoreDestination)
    assert (dimse.called_aet, dimse.host, dimse.port, dimse.calling_aet) == ("ORTHANC", "127.0.0.1", 4242, "ME")
    for bad in ("ftp://x", "dicom://host:4242", "dicom://AN_AE_TITLE_TOO_LONG@h:1", "dicom://A@h"):
        with pytest.raises(ValueError):
            destination_for(bad)


def test_presentation_contexts_follow_the_datasets(source, mask):
    seg = build_dicom_seg(mask, source.affine, source.datasets, LABELS, ALGORITHM)
    sr = build_measurement_report(seg, source.datasets, {"anterior": 1.0, "posterior": 2.0}, ALGORITHM)
    contexts = presentation_contexts([seg, sr])
    assert contexts == {
        str(seg.SOPClassUID): [str(seg.file_meta.TransferSyntaxUID)],
        str(sr.SOPClassUID): [str(sr.file_meta.TransferSyntaxUID)],
    }
