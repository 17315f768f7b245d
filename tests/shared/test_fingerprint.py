"""Dataset fingerprint on synthetic arrays: every statistic checked against numpy computed here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared.datasets.fingerprint import DatasetFingerprint, case_fingerprint, combine, fingerprint_msd_folder


def _case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    image = rng.normal(100.0, 20.0, size=(2, *shape))
    label = np.zeros(shape, dtype=np.uint8)
    label[1:4, 1:5, 2:6] = 1
    label[5:7, 2:4, 1:3] = 2
    return image, label


def test_statistics_match_numpy(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    shapes = [(8, 9, 10), (10, 8, 9), (9, 10, 8)]
    spacings = [(1.0, 1.0, 3.0), (0.8, 0.8, 2.5), (1.0, 0.9, 4.0)]
    arrays = [_case(rng, s) for s in shapes]
    arrays[2][1][5:7, 2:4, 1:3] = 0  # label 2 missing from the last case
    cases = [case_fingerprint(img, lab, sp) for (img, lab), sp in zip(arrays, spacings, strict=True)]
    fp = combine(cases, name="synthetic", modalities=["CT", "MR"], labels={0: "bg", 1: "a", 2: "b"})

    assert fp.case_count == 3
    assert fp.shapes == shapes and fp.spacings == spacings
    assert fp.median_spacing == (1.0, 0.9, 3.0)
    for channel in (0, 1):
        pooled = np.concatenate([img[channel][lab > 0] for img, lab in arrays])
        stats = fp.intensity[channel]
        assert stats.voxels == pooled.size
        assert stats.mean == pytest.approx(pooled.mean())
        assert stats.std == pytest.approx(pooled.std())
        assert stats.median == pytest.approx(np.median(pooled))
        assert stats.p00_5 == pytest.approx(np.percentile(pooled, 0.5))
        assert stats.p99_5 == pytest.approx(np.percentile(pooled, 99.5))
    total = sum(int(np.prod(s)) for s in shapes)
    for value in (1, 2):
        counts = [int((lab == value).sum()) for _, lab in arrays]
        present = [(c, sp) for c, sp in zip(counts, spacings, strict=True) if c]
        stats = fp.label_stats[value]
        assert stats.foreground_share == pytest.approx(sum(counts) / total)
        assert stats.cases_present == len(present)
        assert stats.median_voxels == pytest.approx(np.median([c for c, _ in present]))
        assert stats.median_ml == pytest.approx(np.median([c * np.prod(sp) / 1000 for c, sp in present]))
    assert fp.label_stats[2].cases_present == 2

    path = tmp_path / "fingerprint.json"
    fp.save(path)
    assert DatasetFingerprint.load(path) == fp
    assert '"foreground":' not in path.read_text()  # the per-case voxels are not saved


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="do not match"):
        case_fingerprint(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        case_fingerprint(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 0, 1))
    empty = case_fingerprint(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 1, 1))
    with pytest.raises(ValueError, match="no foreground"):
        combine([empty], name="x", modalities=["MR"], labels={0: "bg", 1: "a"})


def test_msd_folder(hippocampus_dir: Path) -> None:
    fp = fingerprint_msd_folder(hippocampus_dir, limit=3)
    assert fp.case_count == 3 and fp.modalities == ["MR"] and set(fp.label_stats) == {1, 2}
    assert all(s == (1.0, 1.0, 1.0) for s in fp.spacings)
    assert all(0 < st.foreground_share < 0.1 for st in fp.label_stats.values())
