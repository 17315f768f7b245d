"""Logits → label map on the source grid → findings. Pure functions over tensors and arrays.

The mask goes back to the *original* geometry by inverting the model's own inference transforms
(MONAI ``Invertd`` replays each transform's inverse from the tensor's applied operations), so a model
that resamples, reorients or crops never leaves its output on its private grid.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, KeepLargestConnectedComponent

from shared.preprocessing import make_inverter


def argmax_labels(logits: torch.Tensor) -> torch.Tensor:
    """(K, X, Y, Z) logits → (1, X, Y, Z) label indices."""
    return torch.argmax(logits, dim=0, keepdim=True).to(torch.float32)


def invert_to_source(labels: torch.Tensor, preprocessed: MetaTensor, transforms: Compose) -> np.ndarray:
    """Undo the inference transforms on a label map (nearest neighbour), giving (X, Y, Z) uint8 on the source grid."""
    pred = MetaTensor(labels, meta=dict(preprocessed.meta), applied_operations=list(preprocessed.applied_operations))
    inverted = make_inverter(transforms, "pred", nearest=True)({"pred": pred, "image": preprocessed})["pred"]
    return np.asarray(torch.as_tensor(inverted)[0].round().to(torch.uint8).cpu().numpy())


def keep_largest_components(mask: np.ndarray, labels: Mapping[int, str]) -> np.ndarray:
    """Keep only the largest connected component of each foreground label (independently)."""
    applied = [int(v) for v in labels if int(v) != 0]
    if not applied:
        return mask
    keep = KeepLargestConnectedComponent(applied_labels=applied, is_onehot=False, independent=True)
    return np.asarray(keep(torch.as_tensor(mask[None].astype(np.int64)))[0], dtype=np.uint8)


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in mL (1 mL = 1000 mm³), from the affine's determinant."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=float)[:3, :3]))) / 1000.0


def label_findings(mask: np.ndarray, affine: np.ndarray, labels: Mapping[int, str]) -> list[dict[str, Any]]:
    """Per foreground label: voxel count and volume in mL (every label listed, present or not)."""
    counts = np.bincount(mask.ravel().astype(np.int64), minlength=max([0, *labels]) + 1)
    per_voxel = voxel_volume_ml(affine)
    return [
        {"label": int(v), "name": name, "voxels": int(counts[int(v)]), "volume_ml": float(counts[int(v)] * per_voxel)}
        for v, name in sorted(labels.items())
        if int(v) != 0
    ]
