"""Self-configuring training plans (nnU-Net style): a dataset's fingerprint in, a :class:`TrainingPlan` out.

The rules, all pure functions of a :class:`~shared.datasets.fingerprint.DatasetFingerprint`:

* target spacing: the median spacing; when the dataset is anisotropic (coarsest / finest median spacing > 3)
  and the coarse axis also has few voxels (3x its median size < the smallest other axis' median size), the
  coarse axis takes the 10th percentile of its spacings instead, as nnU-Net does, so thick slices are not
  interpolated away nor made thicker;
* patch: every case's shape resampled to the target spacing; if the largest case, rounded up to the
  network's stride product, fits the voxel budget, training uses whole volumes (``sampler: whole``, the
  choice for the hippocampus crops: 48 x 64 x 48); otherwise the median case, shrunk along its largest axis
  (relative to the median shape) until it fits, rounded to the stride product, sampled ``pos_neg`` with
  nnU-Net's one third of patches centred on foreground;
* topology: :func:`shared.training.networks.dynunet_topology` of patch and target spacing;
* batch size: the memory budget divided by an activation estimate (below), at least 2 and at most what
  covers 5 % of the dataset's voxels per step (nnU-Net's cap);
* normalisation per modality: CT is clipped to the fingerprint's foreground 0.5 / 99.5 percentiles and
  z-scored with its foreground mean / std; every other modality is z-scored per image over nonzero voxels.

:func:`apply_plan` fills the fields of a :class:`TrainingConfig` that its YAML did not set;
:func:`plan_for_version` does it with a dataset version's stored fingerprint (what ``voxelflow train`` and
the aggregator's run setup call).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from shared.datasets.fingerprint import DatasetFingerprint, load_version_fingerprint
from shared.storage import ObjectStore
from shared.training.config import TrainingConfig
from shared.training.networks import dynunet_topology, stride_product

ANISOTROPY_THRESHOLD = 3.0
FOREGROUND_SHARE = 1.0 / 3.0  # nnU-Net's oversample_foreground_percent
BYTES_PER_ACTIVATION = 4  # float32; bf16 autocast stores some activations in half, so this errs high
TENSORS_PER_STAGE_VOXEL = 12  # conv, norm, activation x 2 blocks, kept for backward, encoder and decoder
MAX_DATASET_SHARE_PER_STEP = 0.05


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Normalisation(_Frozen):
    modality: str
    scheme: Literal["ct_clip_zscore", "zscore_nonzero"]
    clip: tuple[float, float] | None = Field(default=None, description="CT: foreground 0.5 / 99.5 percentiles.")
    mean: float | None = Field(default=None, description="CT: foreground mean over the dataset.")
    std: float | None = Field(default=None, description="CT: foreground std over the dataset.")


class TrainingPlan(_Frozen):
    dataset: str
    target_spacing: tuple[float, float, float]
    anisotropic: bool
    median_shape_at_target: tuple[float, float, float]
    max_shape_at_target: tuple[int, int, int]
    sampler: Literal["whole", "pos_neg"]
    patch_size: tuple[int, int, int]
    divisible: int = Field(description="Whole volumes are padded to a multiple of this (largest stride product).")
    foreground_share: float = Field(description="pos_neg: share of patches centred on foreground.")
    network: Literal["dynunet"] = "dynunet"
    kernel_size: list[list[int]]
    strides: list[list[int]]
    filters: list[int]
    batch_size: int
    activation_bytes_per_sample: int = Field(description="The estimate the batch size was derived from.")
    memory_budget_gib: float
    normalisation: list[Normalisation]

    def config_values(self) -> dict[str, Any]:
        """The plan as TrainingConfig fields (nested like the YAML)."""
        pos, neg = (1.0, round((1 - self.foreground_share) / self.foreground_share, 6))
        return {
            "network": {"name": self.network, "args": {"spacing": list(self.target_spacing)}},
            "batch_size": self.batch_size,
            "patch": {
                "sampler": self.sampler,
                "size": list(self.patch_size),
                "divisible": self.divisible,
                **({"pos": pos, "neg": neg} if self.sampler == "pos_neg" else {}),
            },
            "validation": {"roi_size": list(self.patch_size)},
        }


def target_spacing(
    spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]]
) -> tuple[tuple[float, ...], bool]:
    """nnU-Net's target spacing: the median, or the 10th percentile on a coarse, thin axis (returns the
    spacing and whether that anisotropy rule applied)."""
    spacing = np.asarray(spacings, dtype=float)
    median = np.median(spacing, axis=0)
    median_shape = np.median(np.asarray(shapes, dtype=float), axis=0)
    coarse = int(np.argmax(median))
    others = [i for i in range(3) if i != coarse]
    anisotropic_spacing = median[coarse] > ANISOTROPY_THRESHOLD * min(median[others])
    anisotropic_voxels = median_shape[coarse] * ANISOTROPY_THRESHOLD < min(median_shape[others])
    target = median.copy()
    if anisotropic_spacing and anisotropic_voxels:
        # never finer than the other axes' coarsest (the rule must not invert the anisotropy)
        target[coarse] = max(float(np.percentile(spacing[:, coarse], 10)), float(max(median[others])) + 1e-5)
    return tuple(float(t) for t in target), bool(anisotropic_spacing and anisotropic_voxels)


def _round_up(shape: Sequence[float], divisor: Sequence[int]) -> tuple[int, int, int]:
    a, b, c = (int(math.ceil(s / d) * d) for s, d in zip(shape, divisor, strict=True))
    return a, b, c


def _fit_patch(shape: Sequence[float], spacing: Sequence[float]) -> tuple[tuple[int, int, int], list[list[int]]]:
    """``shape`` rounded up to the stride product of its own topology, until stable."""
    patch = _round_up(shape, (1, 1, 1))
    for _ in range(4):
        _, strides = dynunet_topology(patch, spacing)
        rounded = _round_up(patch, stride_product(strides))
        if rounded == patch:
            break
        patch = rounded
    return patch, strides


def activation_bytes(patch: Sequence[int], strides: Sequence[Sequence[int]], filters: Sequence[int]) -> int:
    """Activation memory of one sample in a U-Net: per stage, its voxels x its filters x the tensors kept for
    the backward pass (:data:`TENSORS_PER_STAGE_VOXEL`) x 4 bytes. Weights and optimiser state are left out
    (a few MB for these widths); it is an estimate to compare against a budget, not a measurement."""
    voxels = float(np.prod(patch))
    total = 0.0
    for stride, width in zip(strides, filters, strict=True):
        voxels /= float(np.prod(stride))
        total += voxels * width
    return int(total * TENSORS_PER_STAGE_VOXEL * BYTES_PER_ACTIVATION)


def normalisation_for(fp: DatasetFingerprint) -> list[Normalisation]:
    out = []
    for modality, stats in zip(fp.modalities, fp.intensity, strict=True):
        if modality.upper() == "CT":
            out.append(
                Normalisation(
                    modality=modality,
                    scheme="ct_clip_zscore",
                    clip=(stats.p00_5, stats.p99_5),
                    mean=stats.mean,
                    std=stats.std,
                )
            )
        else:
            out.append(Normalisation(modality=modality, scheme="zscore_nonzero"))
    return out


def plan_from_fingerprint(
    fp: DatasetFingerprint,
    *,
    memory_budget_gib: float = 8.0,
    max_patch_voxels: int = 128**3,
    base_filters: int = 8,
    max_filters: int = 320,
) -> TrainingPlan:
    """The plan for ``fp`` (see the module docstring for the rules). ``base_filters`` matches
    :func:`shared.training.networks.build_network`'s DynUNet default, so the estimate describes that network."""
    if memory_budget_gib <= 0 or max_patch_voxels <= 0:
        raise ValueError("memory_budget_gib and max_patch_voxels must be positive")
    spacing, anisotropic = target_spacing(fp.spacings, fp.shapes)
    resampled = np.asarray(fp.shapes, dtype=float) * np.asarray(fp.spacings, dtype=float) / np.asarray(spacing)
    median = np.median(resampled, axis=0)
    largest = np.ceil(resampled.max(axis=0) - 1e-6)
    patch, strides = _fit_patch(largest, spacing)
    sampler: Literal["whole", "pos_neg"] = "whole"
    if math.prod(patch) > max_patch_voxels:
        sampler = "pos_neg"
        shape = median.copy()
        patch, strides = _fit_patch(shape, spacing)
        while math.prod(patch) > max_patch_voxels:
            axis = int(np.argmax(shape / median))  # nnU-Net shrinks the axis largest relative to the median
            shape[axis] = max(1.0, shape[axis] * 0.9)
            patch, strides = _fit_patch(shape, spacing)
    kernels, strides = dynunet_topology(patch, spacing)
    filters = [min(base_filters * 2**i, max_filters) for i in range(len(strides))]
    per_sample = activation_bytes(patch, strides, filters)
    by_memory = int(memory_budget_gib * 2**30 // max(per_sample, 1))
    dataset_voxels = float(np.prod(resampled, axis=1).sum())
    by_dataset = int(MAX_DATASET_SHARE_PER_STEP * dataset_voxels // math.prod(patch))
    batch = max(2, min(by_memory, by_dataset))
    m0, m1, m2 = (float(round(m, 2)) for m in median)
    x0, x1, x2 = (int(x) for x in largest)
    return TrainingPlan(
        dataset=fp.name,
        target_spacing=(spacing[0], spacing[1], spacing[2]),
        anisotropic=anisotropic,
        median_shape_at_target=(m0, m1, m2),
        max_shape_at_target=(x0, x1, x2),
        sampler=sampler,
        patch_size=patch,
        divisible=max(stride_product(strides)),
        foreground_share=FOREGROUND_SHARE,
        kernel_size=kernels,
        strides=strides,
        filters=filters,
        batch_size=batch,
        activation_bytes_per_sample=per_sample,
        memory_budget_gib=memory_budget_gib,
        normalisation=normalisation_for(fp),
    )


def _leaves(value: Any, path: str) -> list[str]:
    if isinstance(value, dict) and value:
        return [leaf for key, item in value.items() for leaf in _leaves(item, f"{path}.{key}")]
    return [path]


def _merge_under(explicit: dict[str, Any], planned: dict[str, Any], prefix: str, filled: list[str]) -> dict[str, Any]:
    """``explicit`` with ``planned``'s values added where ``explicit`` has none (recursively)."""
    merged = dict(explicit)
    for key, value in planned.items():
        path = f"{prefix}{key}"
        if key not in merged:
            merged[key] = value
            filled.extend(_leaves(value, path))
        elif isinstance(value, dict) and isinstance(merged[key], dict):
            merged[key] = _merge_under(merged[key], value, f"{path}.", filled)
    return merged


def apply_plan(config: TrainingConfig, plan: TrainingPlan) -> TrainingConfig:
    """The config with every field its author did not set (pydantic's ``model_fields_set``, recursively:
    ``exclude_unset``) taken from the plan; an explicit field always wins.

    The plan's network arguments (target spacing for DynUNet's topology) are only used when the network is
    the plan's; an explicitly chosen other network keeps its own arguments.
    """
    return _apply(config, plan)[0]


def fields_from_plan(config: TrainingConfig, plan: TrainingPlan) -> list[str]:
    """The dotted paths :func:`apply_plan` takes from the plan for ``config``."""
    return _apply(config, plan)[1]


def _apply(config: TrainingConfig, plan: TrainingPlan) -> tuple[TrainingConfig, list[str]]:
    explicit = config.model_dump(mode="json", exclude_unset=True)
    planned = plan.config_values()
    chosen = explicit.get("network", {}).get("name", plan.network)
    if chosen != plan.network:
        planned.pop("network")
    filled: list[str] = []
    merged = _merge_under(explicit, planned, "", filled)
    return TrainingConfig.model_validate(merged), filled


def plan_for_version(
    store: ObjectStore, version_id: str, config: TrainingConfig, *, memory_budget_gib: float = 8.0
) -> tuple[TrainingConfig, list[str]]:
    """``config`` with the plan of dataset version ``version_id`` applied (:func:`apply_plan`) and the dotted
    fields the plan filled. A version without a stored fingerprint (built before fingerprints were stored, or
    without labelled cases) leaves ``config`` as it is: ``(config, [])``.

    ``config`` must still know which fields its author set (``model_fields_set``: validated from the YAML or
    request body, not from a ``model_dump`` of every field), else nothing is planned."""
    fingerprint = load_version_fingerprint(store, version_id)
    if fingerprint is None:
        return config, []
    return _apply(config, plan_from_fingerprint(fingerprint, memory_budget_gib=memory_budget_gib))
