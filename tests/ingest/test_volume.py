"""Series -> volume reconstruction on real data, checked in world coordinates.

Reference volumes (dcm2niix outputs, the TotalSegmentator label map) store
their voxels in a different order than we do, so nothing here compares raw
array indices: both grids are mapped into world space through their affines
(nibabel's orientation utilities find the axis permutation/flips), and only
then are shapes, voxel-centre positions and intensities compared.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from services.ingest.volume import NonVolumetricSeriesError, SeriesVolume, reconstruct_series

WORLD_TOL_MM = 1e-3

EMR = "enhanced_multiframe_mr"
TCIA = "tcia_brain_tumor_progression_mr"


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def _to_reference_grid(array: np.ndarray, affine: np.ndarray, ref_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder ``array`` (axis permutation + flips) into the voxel order of the reference.

    Returns the reordered array and the affine that goes with it, so the
    caller can then check that this affine really equals the reference one.
    """
    transform = ornt_transform(io_orientation(affine), io_orientation(ref_affine))
    new_array = apply_orientation(array, transform)
    new_affine = affine @ inv_ornt_aff(transform, array.shape[:3])
    return new_array, new_affine


def _max_corner_distance_mm(affine_a: np.ndarray, affine_b: np.ndarray, shape: tuple[int, ...]) -> float:
    """Largest world distance between the same voxel centre under two affines.

    Both maps are affine, so the maximum over the grid is reached at a corner.
    """
    corners = np.array([[*c, 1.0] for c in itertools.product(*[(0, n - 1) for n in shape[:3]])]).T
    return float(np.max(np.linalg.norm((affine_a @ corners - affine_b @ corners)[:3], axis=0)))


def _load_nifti(path: Path) -> nib.Nifti1Image:
    image = nib.load(path)
    assert isinstance(image, nib.Nifti1Image)
    return image


def _assert_same_world_grid(volume: SeriesVolume, ref: nib.Nifti1Image) -> np.ndarray:
    """Assert same grid in world space; return our array in the reference's voxel order."""
    array, affine = _to_reference_grid(volume.array, volume.affine, ref.affine)
    assert array.shape[:3] == ref.shape[:3]
    assert _max_corner_distance_mm(affine, ref.affine, ref.shape) < WORLD_TOL_MM
    return array


# ------------------------------------------------------------------ enhanced MR


def test_siemens_xa30_matches_dcm2niix_in_world_space(shared_data: Path) -> None:
    base = shared_data / EMR / "siemens_xa30_t1w_3d"
    (volume,) = reconstruct_series(_files(base / "dicom"))
    ref = _load_nifti(base / "reference_dcm2niix" / "5_anat-T1w_acq-tfl.nii.gz")

    assert volume.label == ""
    assert sorted(volume.array.shape) == sorted(ref.shape)
    assert volume.array.dtype == np.int16  # no rescale: lossless integers
    np.testing.assert_allclose(volume.spacing, (2.0, 2.0, 2.0), atol=1e-5)
    ours = _assert_same_world_grid(volume, ref)
    np.testing.assert_array_equal(ours, np.asarray(ref.dataobj))


def test_philips_fieldmap_splits_into_magnitude_and_fieldmap(shared_data: Path) -> None:
    """One file, 64 frames = 32 magnitude + 32 field-map frames at the same positions.

    Intensities, measured: the field map equals dcm2niix's ``_fieldmaphz``
    (Hz) to within its int16 quantisation, because Philips' Rescale and Real
    World Value maps coincide for it (slope 0.2442, intercept -500) and
    ``slope * private scale slope (2005,100E) == 1``. The magnitude differs by
    a constant factor only: dcm2niix writes Philips "floating point" values
    (stored / 2005,100E) while we apply the DICOM Rescale Slope, the standard
    display value. So we test equality for the field map, proportionality for
    the magnitude.
    """
    base = shared_data / EMR / "philips_fieldmap"
    volumes = {v.label: v for v in reconstruct_series(_files(base / "dicom"))}
    assert set(volumes) == {"magnitude", "fieldmap"}
    ref_dir = base / "reference_dcm2niix"
    ref_mag = _load_nifti(ref_dir / "Philips_WIP_B0_NS_801_e1.nii.gz")
    ref_fmap = _load_nifti(ref_dir / "Philips_WIP_B0_NS_801_e2_fieldmaphz.nii.gz")

    for volume in volumes.values():
        assert volume.array.shape == (64, 64, 32)
        np.testing.assert_allclose(volume.spacing, (4.0, 4.0, 4.0), atol=1e-4)
        assert len(volume.source_sop_instance_uids) == 1

    fmap = _assert_same_world_grid(volumes["fieldmap"], ref_fmap).astype(float)
    ref_fmap_data = ref_fmap.get_fdata()
    # nibabel moves scl_slope into the array proxy on load; it is one int16 step of the reference (Hz).
    step = float(getattr(ref_fmap.dataobj, "slope", 1.0))
    assert step == pytest.approx(0.2442, abs=1e-4)  # = the Philips rescale slope of the field map
    np.testing.assert_allclose(fmap, ref_fmap_data, atol=step / 2)
    assert fmap.min() == pytest.approx(-495.6, abs=0.1) and fmap.max() == pytest.approx(497.3, abs=0.1)

    mag = _assert_same_world_grid(volumes["magnitude"], ref_mag).astype(float)
    ref_mag_data = ref_mag.get_fdata()
    inside = ref_mag_data > 0.05 * ref_mag_data.max()  # skip background rounding noise
    ratio = ref_mag_data[inside] / mag[inside]
    assert np.std(ratio) / np.mean(ratio) < 1e-3
    assert np.all(mag[ref_mag_data == 0] == 0)


def test_siemens_xa10_fmri_four_files_become_one_4d_volume(shared_data: Path) -> None:
    base = shared_data / EMR / "siemens_xa10_fmri"
    files = _files(base / "dicom")
    (volume,) = reconstruct_series(list(reversed(files)))  # input order must not matter
    ref = _load_nifti(base / "reference_dcm2niix" / "Siemens_REST1_w_SMS_PF7-8_6.nii.gz")

    assert volume.array.shape == (64, 64, 6, 4)
    np.testing.assert_allclose(volume.spacing, (3.375, 3.375, 2.4), atol=1e-4)
    ours = _assert_same_world_grid(volume, ref)
    # Time points are ordered by acquisition time (files 6_1 .. 6_4), as dcm2niix does.
    expected_uids = tuple(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files)
    assert volume.source_sop_instance_uids == expected_uids
    np.testing.assert_array_equal(ours, np.asarray(ref.dataobj))


# ------------------------------------------------------------------ CT, JPEG 2000


@pytest.fixture(scope="module")
def totalseg_ct(shared_data: Path) -> SeriesVolume:
    (volume,) = reconstruct_series(_files(shared_data / "totalsegmentator_ct_example" / "dicom"))
    return volume


def test_totalsegmentator_ct_geometry_and_hu(totalseg_ct: SeriesVolume, shared_data: Path) -> None:
    seg = _load_nifti(shared_data / "totalsegmentator_ct_example" / "nifti" / "example_seg_dicom.nii.gz")
    assert totalseg_ct.array.shape == (512, 512, 20)
    np.testing.assert_allclose(totalseg_ct.spacing, (0.9765625, 0.9765625, 2.0), atol=1e-6)
    assert (int(totalseg_ct.array.min()), int(totalseg_ct.array.max())) == (-1024, 1839)
    assert len(set(totalseg_ct.source_sop_instance_uids)) == 20  # UIDs recovered from file meta

    # The label map is row-flipped relative to DICOM storage order: compare
    # only after mapping our CT onto its grid through the affines.
    ct = _assert_same_world_grid(totalseg_ct, seg).astype(float)
    labels = np.asarray(seg.dataobj).astype(np.int16)
    expected_mean_hu = {1: 80.0, 5: 89.0, 52: 177.0}  # spleen, liver, aorta
    for label, hu in expected_mean_hu.items():
        assert np.count_nonzero(labels == label) > 100
        assert ct[labels == label].mean() == pytest.approx(hu, abs=3.0), label


def test_to_nifti_round_trip(totalseg_ct: SeriesVolume, tmp_path: Path) -> None:
    path = tmp_path / "ct.nii.gz"
    nib.save(totalseg_ct.to_nifti(), path)
    back = _load_nifti(path)
    assert int(back.header["qform_code"]) == 1 and int(back.header["sform_code"]) == 1
    np.testing.assert_allclose(back.affine, totalseg_ct.affine, atol=1e-4)
    np.testing.assert_allclose(back.header.get_qform(), totalseg_ct.affine, atol=1e-4)
    assert back.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(back.dataobj), totalseg_ct.array)


# ------------------------------------------------------------------ TCIA single-frame MR


def _assert_slices_at_image_positions(volume: SeriesVolume, files: list[Path]) -> None:
    """Voxel (0, 0, k) must sit exactly at ImagePositionPatient of slice k (LPS -> RAS)."""
    by_uid = {}
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        by_uid[str(ds.SOPInstanceUID)] = np.asarray(ds.ImagePositionPatient, dtype=float)
    for k, uid in enumerate(volume.source_sop_instance_uids):
        world_ras = (volume.affine @ [0, 0, k, 1])[:3]
        lps = by_uid[uid]
        np.testing.assert_allclose(world_ras, [-lps[0], -lps[1], lps[2]], atol=WORLD_TOL_MM)


def test_tcia_oblique_series_spacing_from_positions(shared_data: Path) -> None:
    files = _files(shared_data / TCIA / "Study1" / "12-T1post-05670")
    (volume,) = reconstruct_series(files)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert float(first.SliceThickness) == 5.0  # the header's thickness is *not* the spacing

    assert volume.array.shape == (512, 512, 22)
    np.testing.assert_allclose(volume.spacing, (0.4296875, 0.4296875, 6.5), atol=1e-3)
    directions = volume.affine[:3, :3] / np.linalg.norm(volume.affine[:3, :3], axis=0)
    assert not np.allclose(np.abs(directions), np.eye(3), atol=1e-2)  # oblique
    # Slice axis is along the normal of the image plane.
    assert abs(np.dot(np.cross(directions[:, 0], directions[:, 1]), directions[:, 2])) == pytest.approx(1.0)
    _assert_slices_at_image_positions(volume, files)


def test_tcia_hippocampus_crop_is_1mm_isotropic(shared_data: Path) -> None:
    files = _files(shared_data / TCIA / "Study1" / "13_HCropVolume")
    (volume,) = reconstruct_series(files)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert (first.Rows, first.Columns) == (51, 35)  # README: 51x35
    assert volume.array.shape == (35, 51, 32)  # (columns, rows, slices)
    np.testing.assert_allclose(volume.spacing, (1.0, 1.0, 1.0), atol=1e-6)
    assert volume.array.dtype == np.int16
    _assert_slices_at_image_positions(volume, files)


# ------------------------------------------------------------------ flags


def _copy_with(src: Path, dst: Path, **changes: object) -> Path:
    ds = pydicom.dcmread(src)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(dst)
    return dst


def _reason(paths: list[Path]) -> str:
    with pytest.raises(NonVolumetricSeriesError) as info:
        reconstruct_series(paths)
    return info.value.reason_code


@pytest.fixture(scope="module")
def hcrop_files(shared_data: Path) -> list[Path]:
    return _files(shared_data / TCIA / "Study1" / "13_HCropVolume")


def test_missing_middle_slice_is_flagged(shared_data: Path) -> None:
    files = _files(shared_data / TCIA / "Study1" / "12-T1post-05670")
    ordered = reconstruct_series(files)[0].source_sop_instance_uids
    by_uid = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    middle = by_uid[ordered[len(ordered) // 2]]
    assert _reason([f for f in files if f != middle]) == "missing_slices"


def test_mixed_orientations_are_flagged(shared_data: Path, hcrop_files: list[Path]) -> None:
    t1post = _files(shared_data / TCIA / "Study1" / "12-T1post-05670")
    assert _reason(hcrop_files[:3] + t1post[:3]) == "mixed_orientation"


def test_mixed_pixel_spacing_is_flagged(hcrop_files: list[Path], tmp_path: Path) -> None:
    odd = _copy_with(hcrop_files[1], tmp_path / "odd.dcm", PixelSpacing=[0.5, 0.5])
    assert _reason([hcrop_files[0], odd, *hcrop_files[2:]]) == "mixed_geometry"


def test_duplicate_positions_are_flagged(hcrop_files: list[Path], tmp_path: Path) -> None:
    """A second, different image at one position (a twin with identical pixels collapses instead:
    tests/ingest/test_reconstruction_dcm2niix.py)."""
    other = pydicom.dcmread(hcrop_files[0])
    halved = (other.pixel_array // 2).astype(other.pixel_array.dtype).tobytes()
    twin = _copy_with(hcrop_files[0], tmp_path / "twin.dcm", SOPInstanceUID=generate_uid(), PixelData=halved)
    assert _reason([*hcrop_files, twin]) == "duplicate_positions"


def test_identical_twin_collapses(hcrop_files: list[Path], tmp_path: Path) -> None:
    twin = _copy_with(hcrop_files[0], tmp_path / "twin.dcm", SOPInstanceUID=generate_uid())
    (volume,) = reconstruct_series([*hcrop_files, twin])
    (plain,) = reconstruct_series(hcrop_files)
    assert volume.metadata == {"duplicates_collapsed": 1}
    np.testing.assert_array_equal(volume.array, plain.array)
    kept = set(volume.source_sop_instance_uids)  # either of the two (the one earlier in acquisition order, ties by UID)
    assert len(kept) == 32 and len(kept ^ set(plain.source_sop_instance_uids)) in (0, 2)


def test_single_file_is_flagged(hcrop_files: list[Path]) -> None:
    assert _reason(hcrop_files[:1]) == "single_slice"


def test_localizer_is_flagged(hcrop_files: list[Path], tmp_path: Path) -> None:
    scout = _copy_with(hcrop_files[0], tmp_path / "scout.dcm", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    assert _reason([scout, *hcrop_files[1:]]) == "localizer"


def test_no_pixel_data_is_flagged(hcrop_files: list[Path], tmp_path: Path) -> None:
    empty = _copy_with(hcrop_files[2], tmp_path / "empty.dcm", PixelData=None)
    assert _reason([*hcrop_files[:2], empty, *hcrop_files[3:]]) == "no_pixel_data"


def _secondary_capture(path: Path, z: float) -> Path:
    """A minimal Secondary Capture with (misleading) plane geometry, built from scratch."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = ds.SeriesInstanceUID = ds.FrameOfReferenceUID = generate_uid()
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.ImagePositionPatient = [0.0, 0.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.zeros((8, 8), np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_secondary_capture_is_flagged(tmp_path: Path) -> None:
    files = [_secondary_capture(tmp_path / f"sc{i}.dcm", float(i)) for i in range(3)]
    assert _reason(files) == "secondary_capture"


def test_non_dicom_file_is_unsupported(hcrop_files: list[Path], tmp_path: Path) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("not a DICOM file")
    assert _reason([*hcrop_files[:3], junk]) == "unsupported"


def test_pixel_data_that_no_installed_decoder_reads_flags_the_series(tmp_path: Path):
    """Issue 13: compressed pixel data that no installed decoder handles (here MPEG-2) is stored as sent
    and its series flagged with a reason, never a failed reconstruction task."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import MPEG2MPML

    study, series = generate_uid(), generate_uid()
    paths = []
    for index in range(2):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = MPEG2MPML
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = (
            ds.SOPClassUID,
            ds.SOPInstanceUID,
        )
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "CT"
        ds.Rows = ds.Columns = 4
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, index], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [1, 1], 1
        ds.PixelData = encapsulate([bytes(16)])
        ds["PixelData"].VR = "OB"
        path = tmp_path / f"{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    with pytest.raises(NonVolumetricSeriesError) as refused:
        reconstruct_series(paths)
    assert refused.value.reason_code == "undecodable_pixel_data"
    assert "MPEG2" in refused.value.message or "MPEG" in refused.value.message
