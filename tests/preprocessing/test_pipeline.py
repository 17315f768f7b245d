"""build_transforms on real cases: normalisation, one definition for training and serving, inversion."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from shared.preprocessing import PreprocessingSpec, build_transforms, load_spec, make_inverter
from tests.preprocessing.conftest import hippo_pair


@pytest.mark.parametrize(
    ("number", "image_dtype"),
    [("033", np.uint8), ("210", np.float32), ("243", np.float32)],  # uint8 image; max 1.7e6; float32 label
)
def test_hippocampus_preprocess_normalises_and_pads(hippocampus: Path, number: str, image_dtype: type) -> None:
    pair = hippo_pair(hippocampus, number)
    raw = nib.load(pair["image"])
    assert raw.get_data_dtype() == image_dtype
    raw_label = np.asanyarray(nib.load(pair["label"]).dataobj)
    out = build_transforms(load_spec("mr_hippocampus"), "preprocess")(dict(pair))
    image, label = out["image"], out["label"]
    assert image.shape[0] == 1 and all(n % 16 == 0 for n in image.shape[1:])
    assert label.shape == image.shape
    foreground = image[0][torch.as_tensor(np.pad(np.asanyarray(raw.dataobj) > 0, _pads(raw.shape, image.shape)))]
    assert abs(float(foreground.mean())) < 1e-3 and abs(float(foreground.std()) - 1) < 1e-2  # z-scored
    assert float(image.abs().max()) < 50  # 1.7e6 is gone
    assert set(torch.unique(label).tolist()) == {0.0, 1.0, 2.0}
    assert int((label > 0).sum()) == int((raw_label > 0).sum())  # 1 mm RAS already: no voxel lost
    assert torch.allclose(torch.linalg.norm(image.affine[:3, :3], dim=0), torch.ones(3, dtype=torch.float64))


def _pads(before: tuple[int, ...], after: torch.Size) -> list[tuple[int, int]]:
    """DivisiblePadd pads symmetrically (extra voxel at the end)."""
    return [((a - b) // 2, (a - b) - (a - b) // 2) for b, a in zip(before, after[1:], strict=True)]


def test_inference_applies_exactly_what_training_cached_and_inverts(hippocampus: Path) -> None:
    spec = load_spec("mr_hippocampus")
    pair = hippo_pair(hippocampus, "004")
    cached = build_transforms(spec, "preprocess")(dict(pair))
    inference = build_transforms(spec, "inference")
    served = inference({"image": pair["image"]})
    assert "label" not in served
    assert torch.equal(served["image"].as_tensor(), cached["image"].as_tensor())
    served["pred"] = cached["label"]  # a perfect prediction on the preprocessed grid
    restored = make_inverter(inference)(served)["pred"]
    original = nib.load(pair["label"])
    assert tuple(restored.shape[1:]) == original.shape
    assert np.array_equal(restored[0].numpy(), np.asanyarray(original.dataobj))


def test_inversion_through_reorientation_and_resampling(totalseg: Path) -> None:
    """LPS 3 mm MR → RAS 2 mm, cropped and padded; the label sent back must land on the original grid."""
    spec = PreprocessingSpec.from_yaml(
        """
name: roundtrip
modality: MR
deterministic:
  - {name: Orientationd, args: {axcodes: RAS}}
  - {name: Spacingd, args: {pixdim: [2.0, 2.0, 2.0]}}
  - {name: ScaleIntensityRangePercentilesd, args: {lower: 1, upper: 99, b_min: 0, b_max: 1, clip: true}}
  - {name: CropForegroundd, args: {margin: 2}}
  - {name: DivisiblePadd, args: {k: 16}}
"""
    )
    image_path = str(totalseg / "nifti" / "example_mr_sm.nii.gz")
    label_path = str(totalseg / "nifti" / "example_seg_mr.nii.gz")
    original = nib.load(label_path)
    assert nib.aff2axcodes(original.affine) == ("L", "P", "S")
    cached = build_transforms(spec, "preprocess")({"image": image_path, "label": label_path})
    assert nib.aff2axcodes(cached["image"].affine.numpy()) == ("R", "A", "S")
    assert cached["image"].shape != (1, *original.shape)
    inference = build_transforms(spec, "inference")
    served = inference({"image": image_path})
    served["pred"] = cached["label"]
    restored = make_inverter(inference)(served)["pred"]
    np.testing.assert_allclose(restored.affine.numpy(), original.affine, atol=1e-4)
    truth = np.asanyarray(original.dataobj)
    agreement = float((restored[0].numpy() == truth)[truth > 0].mean())
    assert agreement > 0.95, agreement


def test_augmentation_changes_images_but_keeps_label_classes(hippocampus: Path) -> None:
    spec = PreprocessingSpec.from_yaml(
        """
name: aug
modality: MR
deterministic:
  - {name: NormalizeIntensityd, args: {nonzero: true}}
augmentation:
  - {name: RandRotated, args: {prob: 1.0, range_x: 0.4, range_y: 0.4, range_z: 0.4}}
  - {name: RandZoomd, args: {prob: 1.0, min_zoom: 0.8, max_zoom: 1.2, keep_size: true}}
  - {name: Rand3DElasticd, args: {prob: 1.0, sigma_range: [4, 6], magnitude_range: [20, 40]}}
  - {name: RandGaussianNoised, args: {prob: 1.0, std: 0.1}}
"""
    )
    cached = build_transforms(spec, "preprocess")(hippo_pair(hippocampus, "004"))
    augment = build_transforms(spec, "augment")
    augment.set_random_state(seed=0)
    item = {"image": cached["image"].as_tensor(), "label": cached["label"].as_tensor()}
    out = augment(dict(item))
    assert out["image"].shape == item["image"].shape
    assert not torch.allclose(out["image"], item["image"])
    assert set(torch.unique(out["label"]).tolist()) <= {0.0, 1.0, 2.0}  # nearest on labels: no blended classes
    assert torch.equal(cached["label"].as_tensor(), item["label"])  # input untouched


def test_ct_spec_on_real_ct(totalseg: Path) -> None:
    out = build_transforms(load_spec("ct_abdomen"), "preprocess")(
        {
            "image": str(totalseg / "nifti" / "example_ct_sm.nii.gz"),
            "label": str(totalseg / "nifti" / "example_seg.nii.gz"),
        }
    )
    assert float(out["image"].min()) >= 0.0 and float(out["image"].max()) <= 1.0
    assert out["label"].shape == out["image"].shape and all(n % 32 == 0 for n in out["image"].shape[1:])
    spacing = torch.linalg.norm(out["image"].affine[:3, :3], dim=0)
    assert torch.allclose(spacing, torch.tensor([1.5, 1.5, 2.0], dtype=torch.float64))
    assert int((out["label"] == 5).sum()) > 0  # liver survives resampling and the body crop
