"""The segmentation networks a :class:`TrainingConfig` can name, built from MONAI with small defaults.

Defaults are sized for 1 mm hippocampus crops on a CPU; the YAML ``network.args`` override any of them
(for real GPU training: wider channels, deep supervision, larger Swin features).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets import DynUNet, SegResNet, SwinUNETR, UNet

from shared.training.config import TrainingConfig


def dynunet_topology(
    patch_size: Sequence[int], spacing: Sequence[float] = (1.0, 1.0, 1.0), *, min_size: int = 4, max_depth: int = 5
) -> tuple[list[list[int]], list[list[int]]]:
    """Kernel sizes and strides by the nnU-Net rule (as in MONAI's DynUNet tutorial).

    An axis is downsampled while it is still at least ``2 * min_size`` voxels and its spacing is at most
    twice the finest spacing (anisotropic axes wait until the others catch up); a 3-wide kernel is used
    on an axis once its spacing is within a factor 2 of the finest.
    """
    sizes = list(patch_size)
    spacings = list(spacing)
    strides: list[list[int]] = []
    kernels: list[list[int]] = []
    while len(strides) < max_depth:
        finest = min(spacings)
        ratios = [s / finest for s in spacings]
        stride = [2 if r <= 2 and size >= 2 * min_size else 1 for r, size in zip(ratios, sizes, strict=True)]
        kernel = [3 if r <= 2 else 1 for r in ratios]
        if all(s == 1 for s in stride):
            break
        sizes = [size // s for size, s in zip(sizes, stride, strict=True)]
        spacings = [sp * s for sp, s in zip(spacings, stride, strict=True)]
        kernels.append(kernel)
        strides.append(stride)
    return [[3] * len(sizes), *kernels], [[1] * len(sizes), *strides]


def build_network(config: TrainingConfig, in_channels: int, out_channels: int) -> torch.nn.Module:
    """A freshly initialised network (seed the RNG first for reproducible weights)."""
    name = config.network.name
    args: dict[str, Any] = dict(config.network.args)
    if name == "unet":
        defaults: dict[str, Any] = {"channels": (8, 16, 32, 64), "strides": (2, 2, 2), "num_res_units": 1}
        return UNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, **{**defaults, **args})
    if name == "dynunet":
        patch = config.patch.size if config.patch.sampler != "whole" else config.validation.roi_size
        kernels, strides = dynunet_topology(patch, args.pop("spacing", (1.0, 1.0, 1.0)))
        defaults = {
            "kernel_size": kernels,
            "strides": strides,
            "upsample_kernel_size": strides[1:],
            "filters": [8 * 2**i for i in range(len(strides))],
            "norm_name": "instance",
            "res_block": True,
            "deep_supervision": config.deep_supervision > 0,
            **({"deep_supr_num": config.deep_supervision} if config.deep_supervision else {}),
        }
        return DynUNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, **{**defaults, **args})
    if name == "segresnet":
        defaults = {"init_filters": 8, "blocks_down": (1, 2, 2, 4), "blocks_up": (1, 1, 1)}
        return SegResNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, **{**defaults, **args})
    if name == "swinunetr":
        defaults = {"feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (3, 6, 12, 24), "use_v2": True}
        return SwinUNETR(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, **{**defaults, **args})
    raise ValueError(f"unknown network {name!r}")  # unreachable: TrainingConfig validates the name
