"""QC on real cases: world-coordinate geometry (TotalSegmentator's row-flipped label), values, report."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from services.ingest.volume import reconstruct_series
from services.preprocessing.quality import (
    CaseQC,
    Finding,
    build_qc_report,
    check_case,
    check_case_files,
    check_geometry,
    check_intensity,
    check_label_values,
)


@pytest.fixture(scope="module")
def totalseg_ct(totalseg: Path):
    """The JPEG 2000 DICOM series as a volume (ingest's reconstruction) and its row-flipped NIfTI label."""
    volume = reconstruct_series(sorted((totalseg / "dicom").iterdir()))[0]
    label = nib.load(totalseg / "nifti" / "example_seg_dicom.nii.gz")
    return volume, label


def codes(findings: list[Finding] | CaseQC) -> set[str]:
    items = findings.findings if isinstance(findings, CaseQC) else findings
    return {f.code for f in items}


def test_row_flipped_label_on_the_dicom_grid_passes(totalseg_ct) -> None:
    volume, label = totalseg_ct
    label_array = np.asanyarray(label.dataobj)
    assert volume.array.shape == label_array.shape
    assert not np.allclose(volume.affine, label.affine)  # stored differently ...
    result = check_case(
        "totalseg",
        volume.array,
        volume.affine,
        modality="CT",
        label=label_array,
        label_affine=label.affine,
        allowed_labels=range(1, 118),
    )
    assert result.passed, result.to_dict()  # ... but the same grid in world space
    assert "label_axes_reordered" in codes(result)
    # and it really is aligned in world space: liver (5) and aorta (52) have their HU where the affines say
    flipped = label_array[:, ::-1, :]
    assert 60 < volume.array[flipped == 5].mean() < 120
    assert volume.array[flipped == 52].mean() > 150


def test_truly_mismatched_labels_fail(totalseg_ct, hippocampus: Path) -> None:
    volume, label = totalseg_ct
    label_array = np.asanyarray(label.dataobj)
    shifted = label.affine.copy()
    shifted[2, 3] += 1.0  # half a slice off
    findings = check_geometry(volume.array.shape, volume.affine, label_array.shape, shifted)
    assert codes(findings) == {"geometry_mismatch"} and "1.00 mm" in findings[0].message
    # the classic slice-spacing bug: z spacing taken from SliceThickness (3 mm) instead of positions (2 mm)
    thick = label.affine.copy()
    thick[2, 2] = 3.0
    assert codes(check_geometry(volume.array.shape, volume.affine, label_array.shape, thick)) == {"geometry_mismatch"}
    # a flipped copy of the same grid is the same grid (the check is about world positions, not index order)
    same = check_geometry(volume.array.shape, volume.affine, label_array.shape, volume.affine @ _flip_j(512))
    assert codes(same) == {"label_axes_reordered"}
    # a label from another hippocampus case: other shape, same spacing
    result = check_case_files(
        "mixed",
        hippocampus / "imagesTr" / "hippocampus_004.nii.gz",
        hippocampus / "labelsTr" / "hippocampus_006.nii.gz",
        modality="MR",
        allowed_labels=[1, 2],
    )
    assert not result.passed and "geometry_mismatch" in codes(result)


def _flip_j(n: int) -> np.ndarray:
    flip = np.eye(4)
    flip[1, 1], flip[1, 3] = -1, n - 1
    return flip


@pytest.mark.parametrize("number", ["004", "033", "210", "243"])
def test_real_hippocampus_cases_pass(hippocampus: Path, number: str) -> None:
    result = check_case_files(
        f"hippocampus_{number}",
        hippocampus / "imagesTr" / f"hippocampus_{number}.nii.gz",
        hippocampus / "labelsTr" / f"hippocampus_{number}.nii.gz",
        modality="MR",
        allowed_labels=[1, 2],
    )
    assert result.passed, result.to_dict()
    assert result.spacing == (1.0, 1.0, 1.0)


def test_value_checks() -> None:
    label = np.zeros((4, 4, 4), np.uint8)
    assert codes(check_label_values(label, [1, 2])) == {"label_empty"}
    label[1, 1, 1], label[2, 2, 2] = 1, 3
    assert codes(check_label_values(label, [1, 2])) == {"label_unexpected_values", "label_missing_classes"}
    assert codes(check_label_values(label.astype(np.float32) * 0.5, [1, 2])) == {"label_not_integer"}
    image = np.random.default_rng(0).normal(size=(4, 4, 4)).astype(np.float32)
    image[0, 0, 0] = np.nan
    result = check_case("nan", image, np.eye(4), modality="MR", label=label)
    assert not result.passed and "image_nonfinite" in codes(result)
    assert codes(check_intensity(np.full((3, 3, 3), 7.0), "MR")) == {"image_constant"}
    hu = np.linspace(-1024, 1500, 27).reshape(3, 3, 3)
    assert check_intensity(hu, "CT") == []
    assert codes(check_intensity(hu + 1024, "CT")) == {"ct_not_hounsfield"}  # stored values, rescale lost
    assert codes(check_case("4d", np.zeros((3, 3, 3, 2)), np.eye(4), modality="MR")) == {"image_not_3d"}


def test_report_excludes_failing_cases_with_reasons_and_flags_spacing_outliers(hippocampus: Path) -> None:
    results = [
        check_case_files(
            f"hippocampus_{n}",
            hippocampus / "imagesTr" / f"hippocampus_{n}.nii.gz",
            hippocampus / "labelsTr" / f"hippocampus_{n}.nii.gz",
            modality="MR",
            allowed_labels=[1, 2],
        )
        for n in ("004", "006", "033")
    ]
    image = np.asanyarray(nib.load(hippocampus / "imagesTr" / "hippocampus_004.nii.gz").dataobj)
    coarse = np.diag([3.0, 3.0, 3.0, 1.0])
    results.append(
        check_case("coarse", image, coarse, modality="MR", label=np.zeros(image.shape, np.uint8), label_affine=coarse)
    )
    report = build_qc_report(results, version_id="ds-0123456789abcdef")
    assert report.passed_ids == ["hippocampus_004", "hippocampus_006", "hippocampus_033"]
    assert list(report.excluded) == ["coarse"]
    assert report.excluded["coarse"] == ["label_empty: label has no foreground voxels"]
    data = report.to_dict()
    assert data["n_cases"] == 4 and data["n_excluded"] == 1
    assert data["finding_counts"] == {"label_empty": 1, "spacing_outlier": 1}
    coarse_findings = next(c for c in data["cases"] if c["case_id"] == "coarse")["findings"]
    assert {"code": "spacing_outlier", "severity": "warning"}.items() <= coarse_findings[-1].items()


def test_a_4d_series_volume_is_readable_and_kept_out_of_3d_datasets(shared_data: Path, tmp_path: Path) -> None:
    """The contract's 4-D volume (shared.contracts.layout): ingest writes (X, Y, Z, T); preprocessing reads
    its stats like any case, and QC excludes it from a 3-D dataset with a reason, not an error."""
    from services.preprocessing.case_files import image_stats
    from tests.ingest.dicom_cases import repeat_series

    source = sorted((shared_data / "tcia_brain_tumor_progression_mr" / "Study1" / "13_HCropVolume").iterdir())
    files, _ = repeat_series(source, tmp_path / "dicom", 3, kind="fmri")
    (volume,) = reconstruct_series(files)
    path = tmp_path / "volume.nii.gz"
    nib.save(volume.to_nifti(), path)
    stats = image_stats(path)
    assert stats["shape"] == [35, 51, 32, 3] and stats["spacing_mm"] == pytest.approx([1.0, 1.0, 1.0])
    assert codes(check_case_files("fmri", path, None, modality="MR")) == {"image_not_3d"}
