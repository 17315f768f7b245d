"""TrainingConfig validation and the four networks at a tiny size."""

from __future__ import annotations

import pytest
import torch

from shared.training import TrainingConfig, build_network, load_config
from shared.training.config import CONFIG_DIR
from shared.training.networks import check_divisible, dynunet_topology, stride_product


def test_bundled_configs_load_and_round_trip() -> None:
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"hippocampus_unet", "hippocampus_dynunet"} <= set(names)
    for name in names:
        config = load_config(name)
        assert TrainingConfig.from_yaml(config.to_yaml()) == config


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("epochs: 0", "epochs"),
        ("optimizer: {name: adam}", "optimizer.name"),
        ("optimiser: {name: sgd}", "optimiser"),  # a typo is an error, not a silent default
        ("network: {name: vnet}", "network.name"),
        ("patch: {size: [32, 32]}", "patch.size"),
        ("- a list", "must be a mapping"),
        ("epochs: [1", "not valid YAML"),
        ("network: {name: swinunetr}\npatch: {size: [48, 48, 48]}", "divisible by 32"),
    ],
)
def test_invalid_configs_are_refused_with_the_reason(text: str, needle: str) -> None:
    with pytest.raises(ValueError, match="training configuration") as info:
        TrainingConfig.from_yaml(text)
    assert needle in str(info.value)


def test_unknown_config_name_lists_the_bundled_ones() -> None:
    with pytest.raises(FileNotFoundError, match="hippocampus_unet"):
        load_config("no-such-config")


def test_dynunet_topology_isotropic_follows_nnunet_rules() -> None:
    kernels, strides = dynunet_topology((32, 32, 32))
    assert strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]  # stops at the 4-voxel bottleneck
    assert kernels == [[3, 3, 3]] * 4
    # the hippocampus crop: 48 and 48 reach 6 after three halvings; 64 alone (8 < 3 * 4) is not halved again
    kernels, strides = dynunet_topology((48, 64, 48))
    assert strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert stride_product(strides) == (8, 8, 8)
    check_divisible((48, 64, 48), strides)


def test_dynunet_topology_anisotropic_kernels_use_the_spacing_of_their_stage() -> None:
    # 0.8 x 0.8 x 3 mm: the thick axis is neither convolved (1-wide kernel) nor downsampled at full
    # resolution; after one in-plane halving the spacing is 1.6 x 1.6 x 3 (3 / 1.6 < 2), so from stage 1
    # on the kernel is 3 on every axis and every axis is halved
    kernels, strides = dynunet_topology((192, 160, 56), spacing=(0.8, 0.8, 3.0))
    assert kernels[0] == [3, 3, 1]
    assert strides[1] == [2, 2, 1] and kernels[1] == [3, 3, 3]
    assert strides[2] == [2, 2, 2]
    assert kernels[-1] == [3, 3, 3]  # the bottleneck, as in nnU-Net
    assert stride_product(strides) == (32, 32, 8)  # 56 -> 28 -> 14 -> 7: the third z halving is the last
    # 1 x 1 x 5 mm: the thick axis needs two in-plane halvings (2 mm: 5 / 2 >= 2; 4 mm: 5 / 4 < 2)
    kernels, strides = dynunet_topology((128, 128, 32), spacing=(1.0, 1.0, 5.0))
    assert [s[2] for s in strides[:4]] == [1, 1, 1, 2]
    assert [k[2] for k in kernels[:3]] == [1, 1, 3]


def test_patch_not_divisible_by_the_strides_is_refused() -> None:
    _, strides = dynunet_topology((64, 64, 64))
    with pytest.raises(ValueError, match="not divisible"):
        check_divisible((64, 60, 64), strides)


@pytest.mark.parametrize(
    ("name", "args", "size"),
    [
        ("unet", {}, 32),
        ("dynunet", {"filters": [4, 8, 16, 32]}, 32),
        ("segresnet", {"init_filters": 8}, 32),
        ("swinunetr", {"feature_size": 12}, 64),  # 32 would leave a 1-voxel bottleneck for its instance norm
    ],
)
def test_each_network_builds_and_runs_forward(name: str, args: dict, size: int) -> None:
    shape = [size] * 3
    config = TrainingConfig.model_validate(
        {"network": {"name": name, "args": args}, "patch": {"size": shape}, "validation": {"roi_size": shape}}
    )
    torch.manual_seed(0)
    network = build_network(config, 1, 3).eval()
    with torch.no_grad():
        out = network(torch.randn(1, 1, *shape))
    assert out.shape == (1, 3, *shape)
    assert torch.isfinite(out).all()
