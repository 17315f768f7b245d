"""The nnU-Net-style planner on the real hippocampus fingerprint and on a synthetic anisotropic CT one."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from shared.datasets.fingerprint import DatasetFingerprint, IntensityStats, LabelStats, fingerprint_msd_folder
from shared.training.config import TrainingConfig, load_config
from shared.training.networks import build_network, stride_product
from shared.training.plans import (
    activation_bytes,
    apply_plan,
    fields_from_plan,
    plan_from_fingerprint,
    target_spacing,
)


@pytest.fixture(scope="module")
def hippocampus_fingerprint(hippocampus_dir: Path) -> DatasetFingerprint:
    return fingerprint_msd_folder(hippocampus_dir)  # all 208 cases: ~6 s


def _ct_fingerprint() -> DatasetFingerprint:
    rng = np.random.default_rng(0)
    z_spacing = rng.uniform(2.5, 5.0, size=20)
    spacings = [(0.8, 0.8, float(z)) for z in z_spacing]
    shapes = [(512, 512, int(300 / z)) for z in z_spacing]  # ~30 cm of body at every slice thickness
    stats = IntensityStats(
        mean=40.0, std=60.0, median=45.0, p00_5=-150.0, p99_5=250.0, min=-1000.0, max=2000.0, voxels=10
    )
    return DatasetFingerprint(
        name="ct-like",
        modalities=["CT"],
        labels={0: "background", 1: "organ"},
        case_count=len(shapes),
        spacings=spacings,
        shapes=shapes,
        intensity=[stats],
        label_stats={
            1: LabelStats(name="organ", foreground_share=0.01, median_voxels=1e5, median_ml=50, cases_present=20)
        },
    )


def test_hippocampus_plan_reproduces_the_measured_whole_crop_default(
    hippocampus_fingerprint: DatasetFingerprint,
) -> None:
    plan = plan_from_fingerprint(hippocampus_fingerprint)
    assert plan.target_spacing == (1.0, 1.0, 1.0) and not plan.anisotropic
    assert plan.max_shape_at_target == (43, 59, 47)
    assert plan.sampler == "whole" and plan.patch_size == (48, 64, 48)  # the largest crop, rounded up to 8
    assert plan.strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert plan.kernel_size == [[3, 3, 3]] * 4
    assert all(p % d == 0 for p, d in zip(plan.patch_size, stride_product(plan.strides), strict=True))
    assert [n.scheme for n in plan.normalisation] == ["zscore_nonzero"]  # MR
    # the bundled recipe sets every planned field itself: the plan changes nothing in it
    recipe = load_config("hippocampus_unet")
    assert fields_from_plan(recipe, plan) == [] and apply_plan(recipe, plan) == recipe


def test_ct_like_anisotropic_plan() -> None:
    fp = _ct_fingerprint()
    plan = plan_from_fingerprint(fp)
    z = np.asarray(fp.spacings)[:, 2]
    assert plan.anisotropic
    assert plan.target_spacing[:2] == (0.8, 0.8)
    assert plan.target_spacing[2] == pytest.approx(np.percentile(z, 10))  # not the median
    assert plan.sampler == "pos_neg" and math.prod(plan.patch_size) <= 128**3
    assert plan.strides[1] == [2, 2, 1] and plan.kernel_size[0] == [3, 3, 1]  # the thick axis waits
    divisor = stride_product(plan.strides)
    assert divisor[2] < divisor[0]
    assert all(p % d == 0 for p, d in zip(plan.patch_size, divisor, strict=True))
    (norm,) = plan.normalisation
    assert norm.scheme == "ct_clip_zscore" and norm.clip == (-150.0, 250.0) and (norm.mean, norm.std) == (40.0, 60.0)
    config = apply_plan(TrainingConfig(), plan)
    assert config.patch.neg == pytest.approx(2 * config.patch.pos)  # one patch in three on foreground
    kernels_strides = build_network(config, 1, 2)  # the planned DynUNet builds at the planned patch
    assert kernels_strides.strides == plan.strides  # type: ignore[attr-defined]


def test_target_spacing_keeps_the_median_when_the_thick_axis_has_many_voxels() -> None:
    # 3.5 mm slices but as many slices as in-plane voxels: not nnU-Net's anisotropic case
    spacing, anisotropic = target_spacing([(1.0, 1.0, 3.5), (1.0, 1.0, 5.0), (1.0, 1.0, 4.0)], [(100, 100, 100)] * 3)
    assert spacing == (1.0, 1.0, 4.0) and not anisotropic


def test_batch_size_follows_the_memory_estimate(hippocampus_fingerprint: DatasetFingerprint) -> None:
    strides = [[1, 1, 1], [2, 2, 2]]
    # stage 0: 16**3 voxels x 8 filters; stage 1: 8**3 x 16; x 12 tensors x 4 bytes
    assert activation_bytes((16, 16, 16), strides, [8, 16]) == (4096 * 8 + 512 * 16) * 12 * 4
    tiny = plan_from_fingerprint(hippocampus_fingerprint, memory_budget_gib=0.01)
    assert tiny.batch_size == 2  # the floor
    budget = 0.25
    plan = plan_from_fingerprint(hippocampus_fingerprint, memory_budget_gib=budget)
    assert plan.batch_size == int(budget * 2**30 // plan.activation_bytes_per_sample) == 3
    assert plan_from_fingerprint(hippocampus_fingerprint, memory_budget_gib=64).batch_size == 4  # 5 % of the data


def test_explicit_config_fields_survive_apply_plan(hippocampus_fingerprint: DatasetFingerprint) -> None:
    plan = plan_from_fingerprint(hippocampus_fingerprint)
    config = TrainingConfig.from_yaml("epochs: 3\npatch: {size: [32, 32, 32]}\nnetwork: {name: unet}")
    planned = apply_plan(config, plan)
    assert planned.patch.size == (32, 32, 32) and planned.epochs == 3
    assert planned.network.name == "unet" and planned.network.args == {}  # no DynUNet spacing for a UNet
    assert planned.patch.sampler == "whole" and planned.batch_size == plan.batch_size
    assert planned.validation.roi_size == (48, 64, 48)
    assert fields_from_plan(config, plan) == [
        "batch_size",
        "patch.sampler",
        "patch.divisible",
        "validation.roi_size",
    ]
    empty = apply_plan(TrainingConfig(), plan)
    assert empty.network.name == "dynunet" and empty.network.args == {"spacing": [1.0, 1.0, 1.0]}


def test_voxelflow_plan_prints_the_hippocampus_plan(hippocampus_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from shared.cli import main

    main(["plan", str(hippocampus_dir)])
    fields = yaml.safe_load(capsys.readouterr().out.split("# the whole plan")[0])
    assert fields["patch"] == {"sampler": "whole", "size": [48, 64, 48], "divisible": 8}


def test_voxelflow_plan_refuses_a_missing_folder(tmp_path: Path) -> None:
    from shared.cli import main

    with pytest.raises(SystemExit, match="neither an MSD folder nor a dataset version id"):
        main(["plan", str(tmp_path / "nope")])
