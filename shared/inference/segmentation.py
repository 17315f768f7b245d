"""One volume through one model: preprocess → sliding-window predict → postprocess → invert to the source grid.

This is the request path of the inference service and the path evaluation scores, so that a reported Dice
is the Dice of what is served: the same image reading (:func:`read_nifti`, what an upload goes through),
the model's own stored inference transforms applied to an in-memory image (``load=False``), the same
:class:`~shared.inference.predictor.SlidingWindowPredictor` settings (window, overlap, blending mode), the
same argmax, the same inversion onto the source grid and the same optional largest-component filter.
"""

from __future__ import annotations

import gzip
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from shared.inference.postprocess import argmax_labels, invert_to_source, keep_largest_components


class VolumeError(ValueError):
    """The image is not a usable 3-D volume (unreadable, not 3-D, NaN, singular affine)."""


def read_nifti(data: bytes | str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(array (i, j, k) float32, RAS affine)`` of a NIfTI-1 file or its bytes (gzipped or not).

    4-D only with a single volume; the affine is taken as is. The inference service reads uploads with
    it and evaluation reads cases with it, so both feed the transforms the very same array.
    """
    import nibabel as nib

    if isinstance(data, str | Path):
        data = Path(data).read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise VolumeError(f"corrupt gzip: {exc}") from exc
    try:
        image: Any = nib.Nifti1Image.from_bytes(data)
        array = np.asanyarray(image.dataobj, dtype=np.float32)
    except Exception as exc:
        raise VolumeError(f"not a readable NIfTI-1 image: {exc}") from exc
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3 or min(array.shape) < 1:
        raise VolumeError(f"expected a 3-D volume, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise VolumeError("the image contains NaN or infinite values")
    affine = np.asarray(image.affine, dtype=float)
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise VolumeError("the NIfTI affine is singular")
    return np.ascontiguousarray(array), affine


def preprocess(transforms: Compose, array: np.ndarray, affine: np.ndarray, name: str = "upload") -> MetaTensor:
    """The model's own inference transforms (built with ``load=False``) on an ``(i, j, k)`` image."""
    image = MetaTensor(torch.from_numpy(np.asarray(array, np.float32)[None]), affine=torch.from_numpy(affine))
    image.meta["filename_or_obj"] = name
    image.meta["original_channel_dim"] = 0  # already channel first: EnsureChannelFirstd keeps it as is
    return transforms({"image": image})["image"]


@dataclass
class SegmentedVolume:
    mask: np.ndarray  # (i, j, k) uint8 on the source grid
    preprocessed_shape: tuple[int, ...]  # spatial shape the windows ran over
    model_seconds: float  # time in the predictor (all windows)


def segment_array(
    predict: Callable[[torch.Tensor], torch.Tensor],
    transforms: Compose,
    labels: Mapping[int, str],
    array: np.ndarray,
    affine: np.ndarray,
    *,
    name: str = "upload",
    largest_component: bool | Sequence[int] = False,
) -> SegmentedVolume:
    """Label map of ``array`` on its own grid. ``predict``: ``(1, C, X, Y, Z)`` → logits ``(1, K, X, Y, Z)``,
    a :class:`~shared.inference.predictor.SlidingWindowPredictor` (or a served model's ``predict``).
    ``largest_component``: keep only the largest component of every label (True), of the labels named, or none."""
    preprocessed = preprocess(transforms, array, affine, name)
    started = time.perf_counter()
    with torch.inference_mode():
        logits = predict(preprocessed.as_tensor()[None].to(torch.float32))
    model_seconds = time.perf_counter() - started
    mask = invert_to_source(argmax_labels(logits[0]), preprocessed, transforms)
    if mask.shape != tuple(array.shape):
        raise RuntimeError(f"inverted mask {mask.shape} does not match the source {tuple(array.shape)}")
    if largest_component is True:
        mask = keep_largest_components(mask, labels)
    elif largest_component:
        mask = keep_largest_components(mask, {v: n for v, n in labels.items() if v in set(largest_component)})
    return SegmentedVolume(mask=mask, preprocessed_shape=tuple(preprocessed.shape[1:]), model_seconds=model_seconds)


def predict_labels(predict: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Label map ``(1, X, Y, Z)`` (int64) of an already preprocessed channel-first image ``(C, X, Y, Z)``.

    For images that are already in the model's space (the cached cases of a dataset version): the same
    predictor and argmax as :func:`segment_array`, without the transforms and their inversion.
    """
    tensor = torch.as_tensor(image, dtype=torch.float32)
    if tensor.ndim != 4:
        raise ValueError(f"image must be channel-first (C, X, Y, Z), got shape {tuple(tensor.shape)}")
    with torch.inference_mode():
        logits = predict(tensor[None])
    return argmax_labels(logits[0]).to(torch.int64).cpu()
