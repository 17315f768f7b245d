"""Segmentation quality per case and label, and its summary over cases with bootstrap confidence intervals.

Pure functions over integer label maps; the arithmetic is MONAI's (``monai.metrics``) so that numbers
match what the rest of the field reports. What MONAI leaves to the caller is how empty structures count,
so it is fixed here once, for every consumer (aggregation, the promotion gate, ``voxelflow evaluate``):

* truth and prediction both empty: Dice = IoU = 1, HD95 = ASD = 0 (nothing to find and nothing found);
* exactly one of them empty: Dice = IoU = 0; HD95 and ASD are undefined (NaN);
* a ratio with a zero denominator (sensitivity with no true voxels, PPV with no predicted voxels, ...):
  NaN, as ``compute_confusion_matrix_metric`` returns.

NaN means "undefined for this case", never "bad": :func:`summarise` leaves NaNs out of the mean and the
bootstrap, and reports how many cases were left out (``n_undefined``) so a reader can see it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_confusion_matrix_metric,
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
    get_confusion_matrix,
)
from scipy import stats

#: Every metric a case record carries, in report order.
METRICS = ("dice", "iou", "hd95", "asd", "sensitivity", "specificity", "ppv", "npv")
_CONFUSION = {
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "ppv": "precision",
    "npv": "negative predictive value",
}


def _as_label_map(array: Any, what: str) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(array) if not isinstance(array, torch.Tensor) else array)
    while tensor.ndim > 3 and tensor.shape[0] == 1:  # (1, X, Y, Z) channel-first label maps
        tensor = tensor[0]
    if tensor.ndim not in (2, 3):
        raise ValueError(
            f"{what} must be a 2-D or 3-D label map (optionally with one leading channel), "
            f"got shape {tuple(tensor.shape)}"
        )
    if tensor.is_floating_point():
        rounded = torch.round(tensor)
        if not torch.equal(rounded, tensor):
            raise ValueError(f"{what} holds non-integer values: it must be a label map, not probabilities")
        tensor = rounded
    return tensor.to(torch.int64)


def _surface_distances(pred: torch.Tensor, true: torch.Tensor, spacing: list[float] | None) -> tuple[float, float]:
    """HD95 and symmetric ASD of one non-empty (1, 1, ...) mask pair, in the units of ``spacing``."""
    with warnings.catch_warnings():
        # MONAI 1.6 passes a deprecated argument to itself inside these functions; nothing for us to change
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        hd95 = compute_hausdorff_distance(pred, true, include_background=True, percentile=95, spacing=spacing)
        asd = compute_average_surface_distance(pred, true, include_background=True, symmetric=True, spacing=spacing)
    return float(hd95[0, 0]), float(asd[0, 0])


def case_metrics(
    prediction: Any,
    truth: Any,
    labels: Mapping[int, str],
    spacing: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """One record per foreground label (label 0 is background and skipped) with every metric of ``METRICS``.

    ``prediction`` and ``truth`` are label maps of the same spatial shape (numpy or torch, ``(X, Y, Z)``
    or ``(1, X, Y, Z)``); ``spacing`` (mm per voxel along each axis) scales HD95 and ASD to millimetres.
    """
    pred = _as_label_map(prediction, "prediction")
    true = _as_label_map(truth, "truth")
    if pred.shape != true.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from truth shape {tuple(true.shape)}")
    if spacing is not None and len(spacing) != pred.ndim:
        raise ValueError(f"spacing has {len(spacing)} values for a {pred.ndim}-D label map")
    foreground = sorted(int(k) for k in labels if int(k) != 0)
    if not foreground:
        raise ValueError("labels names no foreground label (keys other than 0)")
    # (1, L, X, Y, Z) binary masks, one channel per foreground label: MONAI's batch-first one-hot layout.
    y_pred = torch.stack([(pred == k) for k in foreground]).unsqueeze(0).float()
    y = torch.stack([(true == k) for k in foreground]).unsqueeze(0).float()

    dice = compute_dice(y_pred, y, include_background=True, ignore_empty=False)[0]
    iou = compute_iou(y_pred, y, include_background=True, ignore_empty=False)[0]
    confusion = get_confusion_matrix(y_pred, y, include_background=True)
    ratios = {key: compute_confusion_matrix_metric(name, confusion)[0] for key, name in _CONFUSION.items()}
    spacing_arg = [float(s) for s in spacing] if spacing is not None else None

    records = []
    for index, label in enumerate(foreground):
        pred_any = bool(y_pred[0, index].any())
        true_any = bool(y[0, index].any())
        if pred_any and true_any:
            hd95, asd = _surface_distances(y_pred[:, index : index + 1], y[:, index : index + 1], spacing_arg)
        elif not pred_any and not true_any:
            hd95 = asd = 0.0
        else:
            hd95 = asd = math.nan
        record: dict[str, Any] = {
            "label": label,
            "label_name": str(labels.get(label, labels.get(str(label), label))),  # type: ignore[call-overload]
            "truth_voxels": int(y[0, index].sum()),
            "predicted_voxels": int(y_pred[0, index].sum()),
            "dice": float(dice[index]),
            "iou": float(iou[index]),
            "hd95": hd95,
            "asd": asd,
        }
        record.update({key: float(values[index]) for key, values in ratios.items()})
        records.append(record)
    return records


def bootstrap_ci(
    values: Sequence[float], n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (``scipy.stats.bootstrap``); NaN bounds for fewer than 2 values."""
    data = np.asarray(values, dtype=float)
    if data.size < 2:
        return (math.nan, math.nan)
    if np.all(data == data[0]):  # no spread: every resample has the same mean
        return (float(data[0]), float(data[0]))
    result = stats.bootstrap(
        (data,), np.mean, n_resamples=n_boot, confidence_level=level, method="percentile", rng=seed
    )
    return (float(result.confidence_interval.low), float(result.confidence_interval.high))


def summarise(
    records: Sequence[Mapping[str, Any]],
    n_boot: int = 1000,
    seed: int = 0,
    metrics: Sequence[str] = METRICS,
) -> dict[str, dict[str, dict[str, float | int]]]:
    """Per label name and metric: ``mean``, ``ci_low``, ``ci_high`` (bootstrap 95 %), ``n``, ``n_undefined``.

    ``records`` are :func:`case_metrics` records (any extra keys such as ``case_id`` are ignored). Cases
    where a metric is NaN (see the module docstring) are left out of that metric's mean and interval.
    """
    by_label: dict[str, dict[str, list[float]]] = {}
    for record in records:
        per_metric = by_label.setdefault(str(record["label_name"]), {m: [] for m in metrics})
        for metric in metrics:
            per_metric[metric].append(float(record[metric]))
    summary: dict[str, dict[str, dict[str, float | int]]] = {}
    for label_name, per_metric in by_label.items():
        summary[label_name] = {}
        for metric, values in per_metric.items():
            finite = [v for v in values if math.isfinite(v)]
            low, high = bootstrap_ci(finite, n_boot=n_boot, seed=seed)
            summary[label_name][metric] = {
                "mean": float(np.mean(finite)) if finite else math.nan,
                "ci_low": low,
                "ci_high": high,
                "n": len(finite),
                "n_undefined": len(values) - len(finite),
            }
    return summary


def mean_dice_per_case(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean Dice over the foreground labels of each case (``case_id`` key): the promotion gate's per-case score."""
    grouped: dict[str, list[float]] = {}
    for record in records:
        grouped.setdefault(str(record["case_id"]), []).append(float(record["dice"]))
    return {case_id: float(np.mean(values)) for case_id, values in grouped.items()}
