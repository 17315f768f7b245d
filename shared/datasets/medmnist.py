"""MedMNIST 3-D volumes (e.g. AdrenalMNIST3D) as classification cases, and a deterministic test split.

The ``.npz`` layout is MedMNIST's own: ``{part}_images`` (N, D, H, W) uint8 and ``{part}_labels`` (N, 1)
for the parts it holds (the bundled ``adrenalmnist3d_64_trainval.npz`` has train and val, not test).
A case is ``{"image": (1, D, H, W) float32 in [0, 1], "label": int64 scalar tensor, "case_id": "train-0007"}``:
the same dict shape segmentation cases have, with one label per volume.

Why a test split is carved out of train here: the official test part is not bundled, and choosing the
operating point and the kept epoch on val must not also score the model. The npz holds no patient
identifiers, so the split is by case, stratified by label: if one patient contributes both adrenal glands
(MedMNIST's AdrenalMNIST3D has left and right glands of the same patients), the two may fall on both sides,
which would flatter the test figures. Adjacent indices show no pairing to group by (label agreement of
cases 2k and 2k+1 is 0.675, chance 0.659), so none is attempted; docs/classification.md says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


class MedMNISTError(ValueError):
    """An npz that is not a MedMNIST 3-D file (missing arrays, wrong shapes, labels that do not match)."""


def load_medmnist3d(
    path: Path | str,
    parts: Sequence[str] = ("train", "val"),
    input_size: Sequence[int] | None = None,
    limit: int | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """The cases of each of ``parts`` (the first ``limit`` of each, for smoke runs), intensities scaled to
    [0, 1] and, with ``input_size``, resized once here rather than at every training iteration.

    The resize is MONAI's ``Resize`` in ``area`` mode (an average over the voxels each output voxel
    covers): a downsampled mask keeps its partial-volume edge instead of the aliasing of point sampling.
    """
    with np.load(Path(path)) as npz:
        arrays = {name: npz[name] for name in npz.files}
    out: dict[str, list[dict[str, Any]]] = {}
    resize = None
    if input_size is not None:
        from monai.transforms import Resize

        resize = Resize(spatial_size=tuple(int(s) for s in input_size), mode="area")
    for part in parts:
        images, labels = arrays.get(f"{part}_images"), arrays.get(f"{part}_labels")
        if images is None or labels is None:
            raise MedMNISTError(f"{path}: no {part}_images/{part}_labels arrays (has {sorted(arrays)})")
        if images.ndim != 4 or labels.reshape(-1).shape[0] != images.shape[0]:
            raise MedMNISTError(
                f"{path}: {part} images {images.shape} and labels {labels.shape} are not N 3-D volumes and N labels"
            )
        scale = 255.0 if images.dtype == np.uint8 else 1.0
        cases = []
        count = images.shape[0] if limit is None else min(limit, images.shape[0])
        for index, (image, label) in enumerate(zip(images[:count], labels.reshape(-1)[:count], strict=True)):
            volume = torch.from_numpy(image.astype(np.float32) / scale)[None]
            if resize is not None:
                volume = torch.as_tensor(resize(volume)).float()
            cases.append(
                {
                    "image": volume.contiguous(),
                    "label": torch.tensor(int(label), dtype=torch.int64),
                    "case_id": f"{part}-{index:04d}",
                }
            )
        out[part] = cases
    return out


def stratified_split(
    cases: Sequence[dict[str, Any]], fraction: float, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(kept, split off): ``fraction`` of each label's cases split off, chosen by a seeded permutation, so
    the same seed gives the same split on every machine. Both keep the original order."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    labels = np.array([int(c["label"]) for c in cases])
    taken: set[int] = set()
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        count = round(fraction * members.size)
        taken.update(int(i) for i in rng.permutation(members)[:count])
    kept = [c for i, c in enumerate(cases) if i not in taken]
    split = [c for i, c in enumerate(cases) if i in taken]
    return kept, split
