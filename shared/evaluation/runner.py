"""Evaluate a registered model on labelled NIfTI cases, in each case's original geometry.

Why the original geometry: the model's own stored preprocessing (``build_transforms(spec, "inference")``)
resamples, reorients and pads; ``Invertd`` takes the predicted mask back onto the image grid as the
hospital gave it, and the metrics compare it with the untouched ground truth there, in millimetres.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor
from monai.transforms import EnsureChannelFirst, LoadImage

from shared.evaluation.inference import predict_labels
from shared.evaluation.metrics import case_metrics

log = logging.getLogger("voxelflow.evaluation")
DEFAULT_ROI_SIZE = (48, 64, 48)


def roi_size_of(training_config_yaml: str) -> tuple[int, int, int]:
    """The sliding-window size the model was validated with (``validation.roi_size``), else a default."""
    import yaml

    data = yaml.safe_load(training_config_yaml) or {}
    roi = (data.get("validation") or {}).get("roi_size") if isinstance(data, dict) else None
    return tuple(int(r) for r in roi) if roi else DEFAULT_ROI_SIZE  # type: ignore[return-value]


def evaluate_cases(
    network: torch.nn.Module,
    spec: Any,
    labels: dict[int, str],
    pairs: Sequence[tuple[Path, Path]],
    roi_size: Sequence[int],
    sw_batch_size: int = 1,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[dict[str, Any]]:
    """Records of :func:`case_metrics` with ``case_id`` for every (image, label) pair."""
    from shared.preprocessing import build_transforms, make_inverter

    inference = build_transforms(spec, "inference")
    inverter = make_inverter(inference, "pred", nearest=True)
    load_truth = LoadImage(image_only=True, reader="NibabelReader")
    channel_first = EnsureChannelFirst()
    records: list[dict[str, Any]] = []
    for done, (image_path, label_path) in enumerate(pairs, start=1):
        case_id = Path(image_path).name.removesuffix(".gz").removesuffix(".nii")
        data = inference({"image": str(image_path)})
        prediction = predict_labels(network, data["image"], roi_size, sw_batch_size)
        data["pred"] = prediction.to(torch.float32)
        restored = inverter(data)["pred"]
        truth = channel_first(load_truth(str(label_path)))
        if tuple(restored.shape[1:]) != tuple(truth.shape[1:]):
            raise ValueError(
                f"{case_id}: prediction restored to {tuple(restored.shape[1:])} but the label is "
                f"{tuple(truth.shape[1:])}: image and label grids differ"
            )
        if not isinstance(truth, MetaTensor):
            raise TypeError(f"{case_id}: the label loader returned no spatial metadata")
        spacing = [float(s) for s in truth.pixdim[:3]]
        for record in case_metrics(torch.round(torch.as_tensor(restored)), truth, labels, spacing):
            records.append({"case_id": case_id, **record})
        if progress:
            progress(done, len(pairs), case_id)
    return records
