"""The networks a :class:`TrainingConfig` can name, built from MONAI with small defaults: segmentation
(UNet, DynUNet, SegResNet, SwinUNETR) and classification (DenseNet121, ResNet-18, both 3-D).

Defaults are sized for 1 mm hippocampus crops on a CPU; the YAML ``network.args`` override any of them
(for real GPU training: wider channels, deep supervision, larger Swin features).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets import DenseNet121, DynUNet, SegResNet, SwinUNETR, UNet, resnet18

from shared.training.config import TrainingConfig


def dynunet_topology(
    patch_size: Sequence[int], spacing: Sequence[float] = (1.0, 1.0, 1.0), *, min_size: int = 4, max_depth: int = 5
) -> tuple[list[list[int]], list[list[int]]]:
    """Kernel sizes and strides by nnU-Net's rule (``get_pool_and_conv_props``), as lists for MONAI's DynUNet.

    Stage 0 has stride 1; every later stage halves the axes that are still at least ``2 * min_size``
    voxels and whose spacing is less than twice the finest spacing among those axes (anisotropic axes
    wait until the others catch up); an axis is halved alone only while it is at least ``3 * min_size``.
    The kernel of stage i is chosen at the spacing stage i works at (after its stride): an axis gets a
    3-wide kernel once its spacing there is within a factor 2 of the finest, and keeps it from then on;
    before that it is 1-wide (no convolving across thick slices). The bottleneck kernel is 3 on every
    axis, as in nnU-Net. A patch must be divisible by :func:`stride_product` of the strides.
    """
    if len(patch_size) != len(spacing) or any(s <= 0 for s in spacing) or any(p <= 0 for p in patch_size):
        raise ValueError(f"patch {tuple(patch_size)} and spacing {tuple(spacing)} must be positive, one per axis")
    dim = len(patch_size)
    sizes = [float(p) for p in patch_size]
    spacings = [float(s) for s in spacing]

    def kernel_at(current: list[float], previous: list[int]) -> list[int]:
        finest = min(current)
        return [3 if k == 3 or sp / finest < 2 else 1 for sp, k in zip(current, previous, strict=True)]

    kernels = [kernel_at(spacings, [1] * dim)]
    strides = [[1] * dim]
    while len(strides) <= max_depth:
        candidates = [i for i in range(dim) if sizes[i] >= 2 * min_size]
        if not candidates:
            break
        finest = min(spacings[i] for i in candidates)
        axes = [i for i in candidates if spacings[i] / finest < 2]
        if len(axes) == 1 and sizes[axes[0]] < 3 * min_size:
            break
        stride = [2 if i in axes else 1 for i in range(dim)]
        sizes = [math.ceil(size / s) for size, s in zip(sizes, stride, strict=True)]
        spacings = [sp * s for sp, s in zip(spacings, stride, strict=True)]
        strides.append(stride)
        kernels.append(kernel_at(spacings, kernels[-1]))
    if len(kernels) > 1:
        kernels[-1] = [3] * dim  # the bottleneck
    return kernels, strides


def stride_product(strides: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """Per axis, the product of all strides: what a patch (or padded volume) must be divisible by."""
    return tuple(math.prod(axis) for axis in zip(*strides, strict=True))


def check_divisible(patch_size: Sequence[int], strides: Sequence[Sequence[int]]) -> None:
    """Raise ValueError when ``patch_size`` is not divisible by the strides' product (DynUNet's skips would
    not line up)."""
    divisor = stride_product(strides)
    if any(p % d for p, d in zip(patch_size, divisor, strict=True)):
        raise ValueError(f"patch {tuple(patch_size)} is not divisible by the strides' product {divisor}")


def classifier_outputs(config: TrainingConfig) -> int:
    """Logits a classifier emits: one for BCE (the positive class), ``num_classes`` for CE."""
    return 1 if config.loss.name == "bce" else config.num_classes


def build_network(config: TrainingConfig, in_channels: int, out_channels: int) -> torch.nn.Module:
    """A freshly initialised network (seed the RNG first for reproducible weights).

    A classification network emits :func:`classifier_outputs` logits whatever ``out_channels`` says (a
    caller passing ``num_classes`` gets the one BCE logit), so every builder of a config's network agrees.
    """
    name = config.network.name
    args: dict[str, Any] = dict(config.network.args)
    if name == "densenet121":
        # MONAI's DenseNet121 (growth 32, blocks 6-12-24-16): the plain baseline network
        return DenseNet121(spatial_dims=3, in_channels=in_channels, out_channels=classifier_outputs(config), **args)
    if name == "resnet18":
        # MONAI's 3-D ResNet-18 (Hara et al.; MedMNIST v2's 3-D baseline family). widen_factor 0.25 (16-128
        # channels) by default: the full width costs 16x the compute, which a 2-core CPU cannot spend
        widths: dict[str, Any] = {"widen_factor": 0.25, "shortcut_type": "B"}
        return resnet18(
            spatial_dims=3, n_input_channels=in_channels, num_classes=classifier_outputs(config), **{**widths, **args}
        )
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
