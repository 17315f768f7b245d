"""One volume through one served model: preprocess → predict → postprocess (the KServe-style steps)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from services.inference.model_server import ServedModel
from services.inference.postprocess import argmax_labels, invert_to_source, keep_largest_components, label_findings
from services.inference.sources import SourceVolume


@dataclass
class Segmentation:
    mask: np.ndarray  # (i, j, k) uint8 on the source grid
    affine: np.ndarray  # the source's RAS affine
    findings: list[dict[str, Any]]
    windows: int
    model_seconds: float


def preprocess(model: ServedModel, volume: SourceVolume) -> MetaTensor:
    """Apply the model's own inference transforms to the source image (channel-first MetaTensor)."""
    image = MetaTensor(torch.from_numpy(volume.array[None]), affine=torch.from_numpy(volume.affine))
    image.meta["filename_or_obj"] = volume.series_uid or "upload"
    image.meta["original_channel_dim"] = 0  # already channel first: EnsureChannelFirstd keeps it as is
    return model.transforms({"image": image})["image"]


def segment_volume(model: ServedModel, volume: SourceVolume, *, largest_component: bool = False) -> Segmentation:
    preprocessed = preprocess(model, volume)
    started = time.perf_counter()
    logits = model.predict(preprocessed.as_tensor()[None].to(torch.float32))
    model_seconds = time.perf_counter() - started
    mask = invert_to_source(argmax_labels(logits[0]), preprocessed, model.transforms)
    if mask.shape != volume.array.shape:
        raise RuntimeError(f"inverted mask {mask.shape} does not match the source {volume.array.shape}")
    if largest_component:
        mask = keep_largest_components(mask, model.labels)
    return Segmentation(
        mask=mask,
        affine=volume.affine,
        findings=label_findings(mask, volume.affine, model.labels),
        windows=model.windows_for(tuple(preprocessed.shape[1:])),
        model_seconds=model_seconds,
    )
