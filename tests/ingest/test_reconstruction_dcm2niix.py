"""Series -> volume for what scanners write beyond a plain stack, each case compared with dcm2niix.

Mosaics (Siemens, UIH), 4-D series (single-frame fMRI/DWI/multi-echo, enhanced multi-frame in one file),
gantry tilt, duplicate slices and gaps. The DICOM comes from real headers and pixels where the bundled
data has them (tests/ingest/dicom_cases.py), from pydicom's and pydicom-data's files, and from what
highdicom builds; dcm2niix (Debian package, ci/install-system.sh) runs on the same folder as the reference.
Everything is compared in world space (tests/ingest/dcm2niix.py): grids through their affines, values
where voxel centres coincide, b-vectors as RAS directions. Where dcm2niix itself differs, the test says
what it does and checks ours against the DICOM geometry directly (docs/ingest-reconstruction.md lists these).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from scipy.ndimage import map_coordinates

from services.ingest.volume import NonVolumetricSeriesError, SeriesVolume, reconstruct_series
from tests.ingest import dicom_cases as cases
from tests.ingest.dcm2niix import (
    assert_same_world_grid,
    run_dcm2niix,
    to_reference_grid,
    world_bvecs,
)

TCIA = "tcia_brain_tumor_progression_mr"
B_VALUES = [0.0, 1000.0, 1000.0, 2000.0]
B_VECTORS = [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.6, 0.8], [0.36, 0.48, 0.8]]


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


@pytest.fixture(scope="module")
def hcrop(shared_data: Path) -> list[Path]:
    """A real 32-slice 1 mm MR series (TCIA HippoCrop), the source of the 4-D series below."""
    return _files(shared_data / TCIA / "Study1" / "13_HCropVolume")


def _assert_matches(volume: SeriesVolume, folder: Path, out: Path) -> None:
    """One dcm2niix output for the folder: same world grid, equal voxels, same b-values and b-vectors."""
    outputs, log = run_dcm2niix(folder, out)
    assert len(outputs) == 1, log
    (ref,) = outputs
    ours = assert_same_world_grid(volume, ref.image)
    np.testing.assert_array_equal(ours, np.asarray(ref.image.dataobj))
    if volume.b_values:
        assert ref.bvals is not None and ref.bvecs is not None, log
        np.testing.assert_allclose(volume.b_values, ref.bvals, atol=0.01)
        np.testing.assert_allclose(np.asarray(volume.b_vectors), world_bvecs(ref.bvecs, ref.image.affine), atol=1e-4)
    else:
        assert ref.bvals is None


# ------------------------------------------------------------------ mosaics


def test_siemens_mosaic_dwi_matches_dcm2niix(tmp_path: Path) -> None:
    """Real Siemens Trio DWI mosaic headers (CSA: 48 images in a 7x7 grid), tiles of known volumes."""
    files, written = cases.siemens_mosaic_dwi(tmp_path / "dicom")
    (volume,) = reconstruct_series(list(reversed(files)))  # file order must not matter

    assert volume.array.shape == (128, 128, 48, 3)
    assert volume.metadata == {"mosaic": "siemens", "frame_axis": "diffusion"}
    assert volume.source_sop_instance_uids == tuple(str(pydicom.dcmread(f).SOPInstanceUID) for f in files)
    assert volume.b_values == (0.0, 1000.0, 1000.0)  # the CSA's nominal B_value, as dcm2niix
    np.testing.assert_allclose(volume.spacing, (1.796875, 1.796875, 3.0), atol=1e-5)  # SpacingBetweenSlices
    _assert_matches(volume, tmp_path / "dicom", tmp_path / "dcm2niix")
    # every tile landed in its slice, in order: each frame is the written volume (highdicom may run the
    # slice axis the other way, to keep the axes right-handed)
    for frame, expected in enumerate(written):
        ours = volume.array[..., frame]
        assert np.array_equal(ours, expected) or np.array_equal(ours[:, :, ::-1], expected)


def test_uih_grid_dwi_matches_dcm2niix(tmp_path: Path) -> None:
    """UIH "VFRAME" grids: 14 slices in 4 columns x 4 rows (UIH drops empty rows), positions per slice."""
    volumes = [cases.pattern_volume((40, 36, 14), seed=s) for s in range(4)]
    files = cases.uih_grid_series(tmp_path / "dicom", volumes, b_values=B_VALUES, b_vectors=B_VECTORS)
    assert pydicom.dcmread(files[0]).Rows == 4 * 36 and pydicom.dcmread(files[0]).Columns == 4 * 40
    (volume,) = reconstruct_series(files)

    assert volume.array.shape == (40, 36, 14, 4)
    assert volume.metadata == {"mosaic": "uih", "frame_axis": "diffusion"}
    np.testing.assert_allclose(volume.spacing, (2.0, 2.0, 3.0), atol=1e-5)
    _assert_matches(volume, tmp_path / "dicom", tmp_path / "dcm2niix")


# ------------------------------------------------------------------ 4-D single-frame


@pytest.mark.parametrize(
    "kind, options",
    [
        ("fmri", {}),
        ("dwi", {"b_values": B_VALUES, "b_vectors": B_VECTORS}),
        ("dwi", {"b_values": B_VALUES, "b_vectors": B_VECTORS, "position_major": True}),
    ],
    ids=["fmri", "dwi", "dwi-numbered-slice-by-slice"],
)
def test_repeated_positions_become_4d_as_dcm2niix(
    hcrop: list[Path], tmp_path: Path, kind: str, options: dict[str, object]
) -> None:
    files, _ = cases.repeat_series(hcrop, tmp_path / "dicom", 4, kind=kind, **options)  # type: ignore[arg-type]
    (volume,) = reconstruct_series(files)

    assert volume.array.shape == (35, 51, 32, 4)
    assert volume.metadata == {"frame_axis": "time" if kind == "fmri" else "diffusion"}
    assert len(volume.source_sop_instance_uids) == 128 == len(set(volume.source_sop_instance_uids))
    if kind == "fmri":
        assert volume.b_values == () and volume.b_vectors == ()
    else:
        assert volume.b_values == tuple(B_VALUES)
    _assert_matches(volume, tmp_path / "dicom", tmp_path / "dcm2niix")


def test_multi_echo_becomes_one_volume_per_echo(hcrop: list[Path], tmp_path: Path) -> None:
    echo_times = [10.0, 20.0, 30.0, 40.0]
    files, _ = cases.repeat_series(hcrop, tmp_path / "dicom", 4, kind="echo", echo_times=echo_times)
    volumes = reconstruct_series(files)

    assert [v.label for v in volumes] == ["e1", "e2", "e3", "e4"]
    assert [v.metadata["echo_time_ms"] for v in volumes] == echo_times
    outputs, log = run_dcm2niix(tmp_path / "dicom", tmp_path / "dcm2niix")
    assert [o.path.name.rsplit("_", 1)[1] for o in outputs] == ["1.nii", "2.nii", "3.nii", "4.nii"], log  # %e
    for volume, ref in zip(volumes, outputs, strict=True):
        assert volume.array.shape == (35, 51, 32)
        np.testing.assert_array_equal(assert_same_world_grid(volume, ref.image), np.asarray(ref.image.dataobj))


# ------------------------------------------------------------------ 4-D enhanced, one file


@pytest.mark.parametrize("kind", ["fmri", "dwi"])
def test_enhanced_4d_in_one_file_matches_dcm2niix_and_the_single_frame_series(
    hcrop: list[Path], tmp_path: Path, kind: str
) -> None:
    """highdicom converts the single-frame 4-D series into one Enhanced MR file of 128 frames, 4 per
    position; it must give the same 4-D volume (and b-values) as the single-frame files and as dcm2niix."""
    options: dict[str, object] = {"b_values": B_VALUES, "b_vectors": B_VECTORS} if kind == "dwi" else {}
    files, _ = cases.repeat_series(hcrop, tmp_path / "single", 4, kind=kind, **options)  # type: ignore[arg-type]
    (single,) = reconstruct_series(files)
    (tmp_path / "enhanced").mkdir()
    enhanced_file = cases.enhanced_from_series(files, tmp_path / "enhanced" / "mf.dcm")
    assert int(pydicom.dcmread(enhanced_file).NumberOfFrames) == 128
    (volume,) = reconstruct_series([enhanced_file])

    assert volume.array.shape == (35, 51, 32, 4)
    assert volume.source_sop_instance_uids == (str(pydicom.dcmread(enhanced_file).SOPInstanceUID),)
    assert volume.metadata == single.metadata
    np.testing.assert_array_equal(volume.array, single.array)
    np.testing.assert_allclose(volume.affine, single.affine, atol=1e-4)
    assert volume.b_values == single.b_values
    np.testing.assert_allclose(np.asarray(volume.b_vectors).reshape(-1, 3), np.asarray(single.b_vectors).reshape(-1, 3))
    _assert_matches(volume, tmp_path / "enhanced", tmp_path / "dcm2niix")


# ------------------------------------------------------------------ gantry tilt


def _source_pixel_error(volume: SeriesVolume, files: list[Path]) -> np.ndarray:
    """|our value - the DICOM pixel| at the world position of every 4th source pixel inside our grid.

    The position of pixel (column c, row r) of an image is IPP + c*dx*row_cosine + r*dy*column_cosine
    (LPS): this is the DICOM geometry itself, independent of any converter.
    """
    to_index = np.linalg.inv(volume.affine)
    errors = []
    for path in files:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        row, column = np.reshape(np.asarray(ds.ImageOrientationPatient, dtype=float), (2, 3))
        dy, dx = (float(v) for v in ds.PixelSpacing)
        rr, cc = np.mgrid[0 : ds.Rows : 4, 0 : ds.Columns : 4]
        lps = np.asarray(ds.ImagePositionPatient, dtype=float)[:, None, None] + cc * dx * row[:, None, None]
        lps = lps + rr * dy * column[:, None, None]
        ras = lps * np.array([-1.0, -1.0, 1.0])[:, None, None]
        index = np.tensordot(to_index[:3, :3], ras, 1) + to_index[:3, 3][:, None, None]
        values = map_coordinates(volume.array.astype(float), index.reshape(3, -1), order=1, cval=np.nan)
        inside = ~np.isnan(values)
        errors.append(np.abs(values[inside] - pixels[::4, ::4].reshape(-1)[inside]))
    return np.concatenate(errors)


@pytest.fixture(scope="module")
def lidc_ct(shared_data: Path) -> list[Path]:
    """A real GE chest CT slab (LIDC-IDRI-0001, 16 slices of 512x512, 2.5 mm)."""
    return sorted((shared_data / "lidc_idri_ct_slabs" / "dicom" / "LIDC-IDRI-0001").rglob("*.dcm"))


@pytest.mark.parametrize("tilt_deg", [15.0, -15.0])
def test_gantry_tilt_is_resampled_onto_a_regular_grid_and_recorded(
    lidc_ct: list[Path], tmp_path: Path, tilt_deg: float
) -> None:
    files = cases.tilted_ct_series(lidc_ct, tmp_path / "dicom", tilt_deg)
    (volume,) = reconstruct_series(files)

    assert volume.metadata == {
        "gantry_tilt_deg": pytest.approx(15.0, abs=1e-3),
        "resampled": "gantry_tilt",
        "gantry_detector_tilt_deg": -tilt_deg,
    }
    directions = volume.affine[:3, :3] / np.linalg.norm(volume.affine[:3, :3], axis=0)
    np.testing.assert_allclose(directions.T @ directions, np.eye(3), atol=1e-6)  # a regular (orthogonal) grid
    spacing = volume.spacing
    assert spacing[2] == pytest.approx(2.5 * math.cos(math.radians(15.0)), abs=1e-4)  # perpendicular distance
    # grown in-plane so nothing acquired is cut: 15 steps of 2.5 mm * tan(15 deg) = 10.05 mm = 14.3 rows
    assert volume.array.shape == (512, 512 + 14, 16)
    assert volume.array.dtype == np.int16  # CT stays integer HU (rounded), as dcm2niix
    # each source pixel is found at its own world position: linear interpolation of 512x512 CT
    errors = _source_pixel_error(volume, files)
    assert errors.size > 0.9 * 16 * 128 * 128
    assert float(np.median(errors)) < 3.0 and float(np.percentile(errors, 90)) < 30.0


def test_gantry_tilt_voxels_equal_dcm2niix_tilt_output(lidc_ct: list[Path], tmp_path: Path) -> None:
    """dcm2niix 1.0.20220720 writes ``_Tilt_1`` with the same voxels (but one edge row per slice) on the
    same grid shape and axes, but with its origin 13.8 rows away along the row axis (upstream later fixed
    the origin of negative-tilt output: adjustOriginForNegativeTilt). So values and axes are compared with
    it, placement with the DICOM geometry (the test above)."""
    files = cases.tilted_ct_series(lidc_ct, tmp_path / "dicom", -15.0)
    (volume,) = reconstruct_series(files)
    outputs, log = run_dcm2niix(tmp_path / "dicom", tmp_path / "dcm2niix")
    assert "Gantry Tilt based on 0018,1120 15, estimated from slice vector 15" in log  # our header sign is its
    (tilted,) = [o for o in outputs if o.path.name.endswith("_Tilt_1.nii")]
    ours, affine = to_reference_grid(volume.array, volume.affine, tilted.image.affine)
    assert ours.shape == tilted.image.shape
    np.testing.assert_allclose(affine[:3, :3], tilted.image.affine[:3, :3], atol=1e-3)
    theirs = np.asarray(tilted.image.dataobj).astype(float)
    differs = np.abs(ours.astype(float) - theirs) > 1.0
    # per slice exactly one row differs: where the acquired field ends inside the grown grid, dcm2niix
    # repeats the last acquired row, we interpolate towards the padding
    for k in range(ours.shape[2]):
        assert len(np.unique(np.nonzero(differs[..., k])[1])) <= 1, k
    assert differs.mean() < 0.002
    offset = (np.linalg.inv(tilted.image.affine) @ affine)[:3, 3]
    np.testing.assert_allclose(offset, [0.0, -13.804, 0.0], atol=0.01)  # its origin, not ours (see docstring)


# ------------------------------------------------------------------ duplicates and gaps


def test_duplicate_slice_with_identical_pixels_collapses(hcrop: list[Path], tmp_path: Path) -> None:
    """The same image resent under a new SOPInstanceUID is dropped; the volume is dcm2niix's of the series
    without it (dcm2niix itself stacks the twin as a 33rd slice and warns that the spacing varies)."""
    files = cases.copy_series(hcrop, tmp_path / "dicom")
    twin = pydicom.dcmread(files[3])
    twin.SOPInstanceUID = twin.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    twin_folder = tmp_path / "with-twin"
    twin_folder.mkdir()
    for path in files:
        (twin_folder / path.name).write_bytes(path.read_bytes())
    twin.save_as(twin_folder / "twin.dcm")

    (volume,) = reconstruct_series(_files(twin_folder))
    assert volume.metadata == {"duplicates_collapsed": 1}
    assert volume.array.shape == (35, 51, 32)
    original = str(pydicom.dcmread(files[3], stop_before_pixels=True).SOPInstanceUID)
    assert (original in volume.source_sop_instance_uids) != (
        str(twin.SOPInstanceUID) in volume.source_sop_instance_uids
    )
    _assert_matches(volume, tmp_path / "dicom", tmp_path / "dcm2niix")
    _, log = run_dcm2niix(twin_folder, tmp_path / "dcm2niix-twin")
    assert "Interslice distance varies" in log


def test_repeated_position_with_different_pixels_is_flagged_with_where(hcrop: list[Path], tmp_path: Path) -> None:
    files = cases.copy_series(hcrop, tmp_path / "dicom")
    other = pydicom.dcmread(files[5])
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    other.PixelData = (other.pixel_array // 2).astype(other.pixel_array.dtype).tobytes()
    other.save_as(tmp_path / "dicom" / "other.dcm")
    with pytest.raises(NonVolumetricSeriesError) as flagged:
        reconstruct_series(_files(tmp_path / "dicom"))
    assert flagged.value.reason_code == "duplicate_positions"
    assert flagged.value.details["positions"] == [[float(v) for v in other.ImagePositionPatient]]
    assert f"IPP {[round(float(v), 2) for v in other.ImagePositionPatient]}" in flagged.value.message


def test_gaps_are_flagged_with_where_they_are(shared_data: Path, tmp_path: Path) -> None:
    """Three slices removed from a real 22-slice MR series (6.5 mm apart): two adjacent, one alone."""
    files = cases.copy_series(_files(shared_data / TCIA / "Study1" / "12-T1post-05670"), tmp_path / "dicom")
    full = reconstruct_series(files)[0]
    by_uid = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    removed = [full.source_sop_instance_uids[k] for k in (9, 10, 15)]
    for uid in removed:
        by_uid[uid].unlink()

    with pytest.raises(NonVolumetricSeriesError) as flagged:
        reconstruct_series(_files(tmp_path / "dicom"))
    error = flagged.value
    assert error.reason_code == "missing_slices"
    gaps = error.details["gaps"]
    assert sorted(g["missing_slices"] for g in gaps) == [1, 2]
    assert error.details["spacing_mm"] == pytest.approx(6.5, abs=1e-2)
    # where: the missing positions along the normal are those of the removed slices
    row, column = np.reshape(np.asarray(pydicom.dcmread(files[0]).ImageOrientationPatient, dtype=float), (2, 3))
    normal = np.cross(row, column)
    missing_at = [v for g in gaps for v in g["missing_at_mm"]]
    expected = sorted(float(np.asarray(_ipp_of(full, uid), dtype=float) @ normal) for uid in removed)
    np.testing.assert_allclose(sorted(missing_at), expected, atol=0.05)
    assert "2 slice(s) missing between" in error.message and "1 slice(s) missing between" in error.message
    # dcm2niix converts it anyway (a volume with wrong spacing plus an interpolated _Eq copy) and warns
    outputs, log = run_dcm2niix(tmp_path / "dicom", tmp_path / "dcm2niix")
    assert "expected 22 spatial locations per volume, but found 19 slices" in log
    assert sorted(o.path.name.split("_", 1)[1] for o in outputs) == ["1.nii", "1_Eq_1.nii"]


def _ipp_of(volume: SeriesVolume, uid: str) -> list[float]:
    """LPS position of the slice ``uid`` of a single-frame volume, from its affine (voxel (0, 0, k))."""
    k = volume.source_sop_instance_uids.index(uid)
    ras = volume.affine @ [0, 0, k, 1]
    return [-float(ras[0]), -float(ras[1]), float(ras[2])]


# ------------------------------------------------------------------ pip-shipped public files


def _pydicom_file(name: str) -> Path:
    found = get_testdata_file(name, download=False)
    if found is None:
        pytest.fail(f"{name} not found: pydicom-data (requirements-dev.txt) ships it")
    return Path(str(found))


def test_pydicom_data_enhanced_ct_matches_dcm2niix(tmp_path: Path) -> None:
    """pydicom-data's eCT_Supplemental.dcm: Enhanced CT, 2 frames 10 mm apart."""
    cases.copy_series([_pydicom_file("eCT_Supplemental.dcm")], tmp_path / "dicom")
    (volume,) = reconstruct_series(_files(tmp_path / "dicom"))
    assert volume.array.shape == (512, 512, 2)
    _assert_matches(volume, tmp_path / "dicom", tmp_path / "dcm2niix")


def test_pydicom_ct_series_matches_dcm2niix(tmp_path: Path) -> None:
    """pydicom's own 5-slice CT series (dicomdirtests CT5N, downsized to 16x16)."""
    folder = Path(os.path.dirname(_pydicom_file("CT_small.dcm"))) / "dicomdirtests" / "98892001" / "CT5N"
    cases.copy_series(_files(folder), tmp_path / "dicom")
    (volume,) = reconstruct_series(_files(tmp_path / "dicom"))
    assert volume.array.shape == (16, 16, 5)
    _assert_matches(volume, tmp_path / "dicom", tmp_path / "dcm2niix")


def test_pydicom_ct_series_with_a_far_slice_is_a_gap(tmp_path: Path) -> None:
    """pydicom's CT2 series: three slices 1.25 mm apart and one 202.5 mm away. Flagged, with where (the
    message abbreviates the 161 missing positions); dcm2niix warns that the spacing varies."""
    folder = Path(os.path.dirname(_pydicom_file("CT_small.dcm"))) / "dicomdirtests" / "77654033" / "CT2"
    cases.copy_series(_files(folder), tmp_path / "dicom")
    with pytest.raises(NonVolumetricSeriesError) as flagged:
        reconstruct_series(_files(tmp_path / "dicom"))
    assert flagged.value.reason_code == "missing_slices"
    (gap,) = flagged.value.details["gaps"]
    assert gap["missing_slices"] == 161 and gap["before_mm"] - gap["after_mm"] == pytest.approx(202.5, abs=0.01)
    assert len(flagged.value.message) < 400
    _, log = run_dcm2niix(tmp_path / "dicom", tmp_path / "dcm2niix")
    assert "Interslice distance varies" in log


def test_siemens_mosaic_without_its_csa_header_is_flagged(tmp_path: Path) -> None:
    """(0019,xx0A) alone gives the image count but not the slice direction: refused, not guessed."""
    files, _ = cases.siemens_mosaic_dwi(tmp_path / "dicom")
    stripped = []
    for path in files:
        ds = pydicom.dcmread(path)
        del ds[0x00291010]
        stripped.append(tmp_path / path.name)
        ds.save_as(stripped[-1])
    with pytest.raises(NonVolumetricSeriesError) as flagged:
        reconstruct_series(stripped)
    assert flagged.value.reason_code == "unsupported" and "CSA image header" in flagged.value.message
