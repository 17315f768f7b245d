"""voxelflow's own transforms on real images: CT windows by name, N4 bias-field correction."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from shared.preprocessing import WINDOW_PRESETS, CTWindow, CTWindowd, N4BiasFieldCorrection


def test_window_presets_are_the_reading_room_values() -> None:
    assert WINDOW_PRESETS["lung"] == (-600.0, 1200.0)
    assert WINDOW_PRESETS["mediastinum"] == (50.0, 350.0)
    assert WINDOW_PRESETS["bone"] == (300.0, 1500.0)
    assert WINDOW_PRESETS["brain"] == (40.0, 80.0)
    assert WINDOW_PRESETS["abdomen"] == (40.0, 400.0)


@pytest.mark.parametrize("preset", sorted(WINDOW_PRESETS))
def test_ct_window_on_real_ct(totalseg: Path, preset: str) -> None:
    hu = np.asanyarray(nib.load(totalseg / "nifti" / "example_ct_sm.nii.gz").dataobj).astype(np.float32)[None]
    level, width = WINDOW_PRESETS[preset]
    out = np.asarray(CTWindowd(keys="image", preset=preset)({"image": hu})["image"])
    expected = np.clip((hu - (level - width / 2)) / width, 0.0, 1.0)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    # the real scan (air -1024 .. contrast/bone) is wider than any window: every window clips it
    assert out.min() >= 0 and out.max() <= 1
    assert (out == 1).any()
    assert (out == 0).any() == (hu.min() < level - width / 2)


def test_ct_window_explicit_level_width_and_errors() -> None:
    hu = torch.tensor([[-1000.0, -160.0, 40.0, 240.0, 3000.0]])
    out = CTWindow(level=40, width=400, b_min=-1, b_max=1)(hu)
    assert torch.allclose(out, torch.tensor([[-1.0, -1.0, 0.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="either preset or level/width"):
        CTWindow(preset="lung", level=1)
    with pytest.raises(ValueError, match="needs a preset or both"):
        CTWindow(level=40)
    with pytest.raises(ValueError, match="width must be positive"):
        CTWindow(level=40, width=0)


def test_n4_removes_a_synthetic_bias_field_from_real_mr(totalseg: Path) -> None:
    """Multiply a real MR by a smooth 0.6→1.4 gradient; N4 must bring the ratio to the original close to flat."""
    nifti = nib.load(totalseg / "nifti" / "example_mr_sm.nii.gz")
    clean = np.asanyarray(nifti.dataobj).astype(np.float32)
    gradient = np.linspace(0.6, 1.4, clean.shape[0], dtype=np.float32)[:, None, None]
    biased = MetaTensor(torch.from_numpy(clean * gradient)[None], affine=torch.as_tensor(nifti.affine))
    corrected = N4BiasFieldCorrection(shrink_factor=2, iterations=[20, 20])(biased)
    assert isinstance(corrected, MetaTensor) and corrected.shape == biased.shape
    foreground = clean > np.percentile(clean, 60)

    def variation(volume: np.ndarray) -> float:
        ratio = volume[foreground] / clean[foreground]
        return float(ratio.std() / ratio.mean())

    before, after = variation(biased.numpy()[0]), variation(corrected.numpy()[0])
    assert before > 0.19
    assert after < 0.6 * before, (before, after)


def test_n4_rejects_non_volumes() -> None:
    with pytest.raises(ValueError, match="channel-first 3-D"):
        N4BiasFieldCorrection()(np.zeros((4, 4, 4), np.float32))
    with pytest.raises(ValueError, match="shrink_factor"):
        N4BiasFieldCorrection(shrink_factor=0)
