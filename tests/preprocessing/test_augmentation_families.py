"""nnU-Net's augmentation families as spec steps (mr_hippocampus_nnaug): each family touches the keys it
must (intensity and low-resolution: the image only; elastic: both, the label by nearest), a label stays a
label map of its classes, and the whole augmentation is a function of the seed the training loop sets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from shared.preprocessing import PreprocessingSpec, build_transforms, load_spec
from shared.preprocessing.pipeline import resolve_step
from tests.preprocessing.conftest import hippo_pair

#: each family of the nnaug spec (and the elastic option), forced on (prob 1), with nnU-Net's ranges
FAMILIES: dict[str, tuple[str, dict[str, Any], bool]] = {
    "noise": ("RandGaussianNoised", {"std": 0.316, "sample_std": True}, True),
    "blur": ("RandGaussianSmoothd", {"sigma_x": [0.5, 1.0], "sigma_y": [0.5, 1.0], "sigma_z": [0.5, 1.0]}, True),
    "brightness": ("RandScaleIntensityd", {"factors": 0.25}, True),
    "contrast": ("RandScaleIntensityFixedMeand", {"factors": 0.25, "fixed_mean": True, "preserve_range": True}, True),
    "low_resolution": ("RandSimulateLowResolutiond", {"zoom_range": [0.5, 0.6]}, True),
    "inverted_gamma": ("RandAdjustContrastd", {"gamma": [0.7, 1.5], "invert_image": True, "retain_stats": True}, True),
    "elastic": (
        "Rand3DElasticd",
        {"sigma_range": [9, 13], "magnitude_range": [300, 900], "padding_mode": "zeros"},
        False,
    ),
}


@pytest.fixture(scope="module")
def cached(hippocampus: Path) -> dict[str, torch.Tensor]:
    """A preprocessed case as the cache holds it (plain tensors)."""
    out = build_transforms(load_spec("mr_hippocampus"), "preprocess")(hippo_pair(hippocampus, "004"))
    return {"image": out["image"].as_tensor(), "label": out["label"].as_tensor()}


def _one_step(name: str, args: dict[str, Any]) -> PreprocessingSpec:
    return PreprocessingSpec.from_dict(
        {
            "name": "family",
            "modality": "MR",
            "deterministic": [],
            "augmentation": [{"name": name, "args": {"prob": 1.0, **args}}],
        }
    )


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_touches_only_the_keys_it_must(cached: dict[str, torch.Tensor], family: str) -> None:
    name, args, image_only = FAMILIES[family]
    augment = build_transforms(_one_step(name, args), "augment")
    assert augment.transforms[0].keys == (("image",) if image_only else ("image", "label"))
    augment.set_random_state(seed=3)
    out = augment({k: v.clone() for k, v in cached.items()})
    image, label = torch.as_tensor(out["image"]), torch.as_tensor(out["label"])
    assert image.shape == cached["image"].shape and label.shape == cached["label"].shape
    assert not torch.allclose(image, cached["image"]), f"{family} left the image as it was"
    assert torch.isfinite(image).all()
    classes = set(torch.unique(cached["label"]).tolist())
    assert set(torch.unique(label).tolist()) <= classes  # never a value between classes
    assert torch.equal(label, torch.round(label))
    if image_only:
        assert torch.equal(label, cached["label"]), f"{family} changed the label"
    else:  # elastic moves the label with the image (nearest), and keeps most of its foreground
        assert not torch.equal(label, cached["label"])
        assert (label > 0).sum() > 0.5 * (cached["label"] > 0).sum()


def test_low_resolution_simulation_is_image_only_though_monai_files_it_under_spatial() -> None:
    import monai.transforms as mt

    assert mt.RandSimulateLowResolutiond.__module__.startswith("monai.transforms.spatial")
    assert resolve_step("RandSimulateLowResolutiond").image_only
    assert not resolve_step("Rand3DElasticd").image_only and not resolve_step("RandAffined").image_only


def test_the_nnaug_spec_is_mr_hippocampus_plus_the_missing_families() -> None:
    base, full = load_spec("mr_hippocampus"), load_spec("mr_hippocampus_nnaug")
    assert full.hash == base.hash  # same deterministic steps: the same cached cases
    names = [step.name for step in full.augmentation]
    remaining = iter(full.augmentation)  # every measured step of mr_hippocampus, unchanged and in its order
    assert all(any(step == other for other in remaining) for step in base.augmentation)
    assert len(full.augmentation) > len(base.augmentation)
    added = {
        "RandGaussianNoised",
        "RandGaussianSmoothd",
        "RandScaleIntensityFixedMeand",
        "RandSimulateLowResolutiond",
    }
    assert added <= set(names) and "Rand3DElasticd" not in names  # elastic: an option, off by default
    keys = {type(t).__name__: t.keys for t in build_transforms(full, "augment").transforms}
    assert keys["RandSimulateLowResolutiond"] == ("image",) and keys["RandAffined"] == ("image", "label")


def test_the_whole_augmentation_is_a_function_of_the_seed(cached: dict[str, torch.Tensor]) -> None:
    """train_local seeds the augmentation of epoch e with ``set_random_state(epoch_seed(...))``: the same
    seed gives the same sample (resume is bit-identical), another seed another."""
    spec = load_spec("mr_hippocampus_nnaug")
    # every step on, so that each family's own random draws are exercised
    forced = spec.model_copy(
        update={"augmentation": [s.model_copy(update={"args": {**s.args, "prob": 1.0}}) for s in spec.augmentation]}
    )

    def sample(seed: int) -> dict[str, torch.Tensor]:
        augment = build_transforms(forced, "augment")  # a fresh pipeline, as a resumed process builds
        augment.set_random_state(seed=seed)
        out = augment({k: v.clone() for k, v in cached.items()})
        return {k: torch.as_tensor(v) for k, v in out.items()}

    first, again, other = sample(11), sample(11), sample(12)
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["label"], again["label"])
    assert not torch.equal(first["image"], other["image"])
    assert set(torch.unique(first["label"]).tolist()) <= {0.0, 1.0, 2.0}
