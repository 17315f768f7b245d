"""Pure decisions of the inference service: canary share, GPU-memory guard, geometry, findings, inputs."""

from __future__ import annotations

import gzip
import io

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset

from services.inference.admission import (
    AdmissionController,
    OverloadedError,
    check_gpu_memory,
    estimate_inference_bytes,
    fits_in_memory,
)
from services.inference.dicom_seg import GridMismatchError, frames_on_source_grid
from services.inference.model_lifecycle import canary_bucket, routes_to_candidate
from services.inference.model_server import count_windows
from services.inference.sources import SourceError, parse_series_url, volume_from_nifti
from shared.inference.postprocess import keep_largest_components, label_findings


@pytest.mark.parametrize("share", [0.1, 0.25, 0.5])
def test_canary_share_over_many_patients(share: float) -> None:
    patients = [f"PAT-{n:06d}" for n in range(20000)]
    routed = sum(routes_to_candidate(p, share) for p in patients)
    # binomial sd at n=20000 is <= 0.0036: 0.01 is ~3 sd
    assert abs(routed / len(patients) - share) < 0.01
    # the same patient always takes the same route, and a larger share keeps the smaller share's patients
    assert all(routes_to_candidate(p, share) == routes_to_candidate(p, share) for p in patients[:100])
    assert all(routes_to_candidate(p, 0.6) for p in patients if routes_to_candidate(p, share))


def test_canary_off_and_unknown_patient_stay_on_champion() -> None:
    assert not any(routes_to_candidate(f"P{n}", 0.0) for n in range(1000))
    assert not routes_to_candidate(None, 0.9)
    assert not routes_to_candidate("", 0.9)
    assert 0.0 <= canary_bucket("x") < 1.0


def test_gpu_memory_guard_with_simulated_free_memory() -> None:
    """No GPU here: the guard's decision is driven by a simulated free-memory value."""
    need = estimate_inference_bytes(1, 3, (96, 96, 96), 4)
    assert need > 0
    assert fits_in_memory(need, free_bytes=need * 2, reserve_fraction=0.1)
    assert not fits_in_memory(need, free_bytes=int(need * 1.05), reserve_fraction=0.1)
    check_gpu_memory(need, 0.1, 5, free_bytes=lambda: need * 2)  # fits: no exception
    check_gpu_memory(need, 0.1, 5, free_bytes=lambda: None)  # no CUDA: never refuses
    with pytest.raises(OverloadedError) as refused:
        check_gpu_memory(need, 0.1, 7, free_bytes=lambda: need // 2)
    assert (refused.value.status, refused.value.reason, refused.value.retry_after) == (503, "gpu_memory", 7)


def test_admission_refuses_beyond_the_bound() -> None:
    admission = AdmissionController(max_concurrent=1, max_queue=1, wait_seconds=0.2, retry_after=3)
    with admission.slot():
        with pytest.raises(OverloadedError) as timed_out, admission.slot():  # admitted, waits, times out: 503
            pass
        assert timed_out.value.status == 503
        admission._admitted = 2  # simulate a waiting request holding the queue place
        with pytest.raises(OverloadedError) as full, admission.slot():
            pass
        assert (full.value.status, full.value.retry_after) == (429, 3)
        admission._admitted = 1
    assert admission.admitted == 0


def test_count_windows_matches_monai_grid() -> None:
    assert count_windows((32, 32, 32), (32, 32, 32), 0.25) == 1
    assert count_windows((20, 20, 20), (32, 32, 32), 0.25) == 1  # padded up to one window
    assert count_windows((56, 32, 32), (32, 32, 32), 0.25) == 2  # interval 24: starts 0, 24
    assert count_windows((57, 57, 32), (32, 32, 32), 0.25) == 9  # starts 0, 24, 25 per axis


def test_findings_in_millilitres_use_the_voxel_size() -> None:
    mask = np.zeros((10, 10, 10), dtype=np.uint8)
    mask[:2, :5, :1] = 1  # 10 voxels
    mask[5:, 5:, 5:] = 2  # 125 voxels
    affine = np.diag([2.0, 1.5, -1.0, 1.0])  # 3 mm³ per voxel
    findings = label_findings(mask, affine, {0: "bg", 1: "a", 2: "b", 3: "absent"})
    assert findings == [
        {"label": 1, "name": "a", "voxels": 10, "volume_ml": pytest.approx(0.03)},
        {"label": 2, "name": "b", "voxels": 125, "volume_ml": pytest.approx(0.375)},
        {"label": 3, "name": "absent", "voxels": 0, "volume_ml": 0.0},
    ]


def test_keep_largest_component_per_label() -> None:
    mask = np.zeros((12, 12, 12), dtype=np.uint8)
    mask[0:4, 0:4, 0:4] = 1
    mask[8:9, 8:9, 8:9] = 1  # a stray voxel of label 1
    mask[6:8, 0:2, 0:2] = 2
    kept = keep_largest_components(mask, {0: "bg", 1: "a", 2: "b"})
    assert kept[8, 8, 8] == 0 and (kept == 1).sum() == 64 and (kept == 2).sum() == 8


def _slice(position: tuple[float, float, float], rows: int, cols: int, uid: str) -> Dataset:
    ds = Dataset()
    ds.ImagePositionPatient = list(position)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.Rows, ds.Columns = rows, cols
    ds.SOPInstanceUID = uid
    return ds


def test_frames_land_on_their_slice_in_world_coordinates() -> None:
    """The mask's k axis runs *against* the slices' order (RAS affine with -z), slices are given shuffled."""
    rows, cols, depth = 4, 5, 3
    mask = np.arange(cols * rows * depth, dtype=np.int64).reshape(cols, rows, depth)  # (i=col, j=row, k)
    # LPS (x, y, z) of pixel (r, c) on slice z; RAS = (-x, -y, z); voxel (i, j, k) = (c, r, depth-1-z)
    affine = np.array([[-1, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, depth - 1], [0, 0, 0, 1]], dtype=float)
    slices = [_slice((0, 0, z), rows, cols, f"1.2.{z}") for z in (2, 0, 1)]
    frames = frames_on_source_grid(mask, affine, slices)
    for frame, ds in zip(frames, slices, strict=True):
        z = int(ds.ImagePositionPatient[2])
        assert np.array_equal(frame, mask[:, :, depth - 1 - z].T)
    off_grid = _slice((0.5, 0, 0), rows, cols, "1.2.9")
    with pytest.raises(GridMismatchError):
        frames_on_source_grid(mask, affine, [off_grid])


def test_nifti_input_validation(hippocampus_nifti: bytes) -> None:
    volume = volume_from_nifti(hippocampus_nifti, patient_id="P1")
    assert volume.array.ndim == 3 and volume.voxels == int(np.prod(volume.array.shape))
    with pytest.raises(SourceError, match="corrupt gzip"):
        volume_from_nifti(hippocampus_nifti[:100])
    with pytest.raises(SourceError, match="not a readable NIfTI"):
        volume_from_nifti(b"definitely not an image")
    four_d = nib.Nifti1Image(np.zeros((4, 4, 4, 2), dtype=np.float32), np.eye(4))
    buffer = io.BytesIO(gzip.compress(four_d.to_bytes()))
    with pytest.raises(SourceError, match="3-D"):
        volume_from_nifti(buffer.getvalue())


def test_series_url_must_be_under_an_allowed_root() -> None:
    roots = {"http://pacs:8042/dicom-web": {"Authorization": "Basic x"}}
    series = parse_series_url("http://pacs:8042/dicom-web/studies/1.2.3/series/4.5.6", roots)
    assert (series.root, series.study_uid, series.series_uid) == ("http://pacs:8042/dicom-web", "1.2.3", "4.5.6")
    assert series.headers == {"Authorization": "Basic x"}
    with pytest.raises(SourceError) as refused:
        parse_series_url("http://evil:80/dicom-web/studies/1.2.3/series/4.5.6", roots)
    assert refused.value.status == 403
    with pytest.raises(SourceError):
        parse_series_url("http://pacs:8042/dicom-web/studies/1.2.3", roots)
