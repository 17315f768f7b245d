"""One volume through one served model: the shared pipeline (``shared.inference.segment_array``) plus findings.

Preprocessing, sliding windows, post-processing and inversion are ``shared.inference``'s, the code
``voxelflow evaluate`` and the held-out test evaluation run too, so the reported Dice is that of what
is served; this module adds only what a request returns (findings, window count, timings).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from services.inference.model_server import ServedModel
from services.inference.sources import SourceVolume
from shared.inference import label_findings, segment_array


@dataclass
class Segmentation:
    mask: np.ndarray  # (i, j, k) uint8 on the source grid
    affine: np.ndarray  # the source's RAS affine
    findings: list[dict[str, Any]]
    windows: int
    model_seconds: float


def segment_volume(model: ServedModel, volume: SourceVolume, *, largest_component: bool | None = None) -> Segmentation:
    """``largest_component``: True filters every label, False none, None the labels the model chose on
    its validation cases (stored with the version)."""
    result = segment_array(
        model.predict,
        model.transforms,
        model.labels,
        volume.array,
        volume.affine,
        name=volume.series_uid or "upload",
        largest_component=model.largest_component_labels if largest_component is None else largest_component,
    )
    return Segmentation(
        mask=result.mask,
        affine=volume.affine,
        findings=label_findings(result.mask, volume.affine, model.labels),
        windows=model.windows_for(result.preprocessed_shape),
        model_seconds=result.model_seconds,
    )
