"""Lesion detection quality over scans: FROC (sensitivity at fixed false positives per scan) and mAP.

Pure functions of per-scan predicted boxes (with scores) and true boxes, 3-D boxes in MONAI's corner form
``(x1, y1, z1, x2, y2, z2)`` (``monai.data.box_utils`` StandardMode). The matching of predictions to true
boxes is MONAI's (``monai.apps.detection.metrics.matching.matching_batch``: greedy by descending score, the
COCO rule) and AP is MONAI's ``COCOMetric``, so the figures are those MONAI's detection tutorials report.

Why IoU 0.1 by default: nodules are small, and the boxes of a few readers disagree by more than a voxel or
two at the edges; LUNA16-style evaluation counts a hit for a prediction near the nodule, and nnDetection
and MONAI's LUNA16 recipe report mAP at IoU 0.1 for the same reason.

FROC as in LUNA16 (Setio et al. 2017): all predictions of all scans pooled and ranked by score; at each
score cut the sensitivity is (true boxes hit) / (true boxes) and the false positives per scan are
(unmatched predictions) / (scans); the FROC figure is the mean sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and
8 false positives per scan (the highest sensitivity reached without exceeding each rate).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class ScanBoxes:
    """One scan: predicted boxes (N, 6) with scores (N,), and true boxes (M, 6)."""

    pred_boxes: Any
    pred_scores: Any
    true_boxes: Any


def _boxes(value: Any, what: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, 6))
    if array.ndim != 2 or array.shape[1] != 6:
        raise ValueError(f"{what} must be (N, 6) corner boxes x1 y1 z1 x2 y2 z2, got shape {array.shape}")
    if np.any(array[:, 3:] < array[:, :3]):
        raise ValueError(f"{what}: a box has a maximum corner below its minimum corner")
    return array


def _matched(scans: Sequence[ScanBoxes], iou_thresholds: Sequence[float]) -> list[dict[int, dict[str, np.ndarray]]]:
    from monai.apps.detection.metrics.matching import matching_batch
    from monai.data.box_utils import box_iou

    pred_boxes, pred_scores, true_boxes = [], [], []
    for i, scan in enumerate(scans):
        boxes = _boxes(scan.pred_boxes, f"scan {i} predicted boxes")
        scores = np.asarray(scan.pred_scores, dtype=np.float64).reshape(-1)
        if scores.size != boxes.shape[0]:
            raise ValueError(f"scan {i}: {boxes.shape[0]} predicted boxes but {scores.size} scores")
        pred_boxes.append(boxes)
        pred_scores.append(scores)
        true_boxes.append(_boxes(scan.true_boxes, f"scan {i} true boxes"))

    def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.asarray(box_iou(a, b))

    return matching_batch(
        iou_fn=iou,
        iou_thresholds=list(iou_thresholds),
        pred_boxes=pred_boxes,
        pred_classes=[np.zeros(len(b), dtype=np.int64) for b in pred_boxes],
        pred_scores=pred_scores,
        gt_boxes=true_boxes,
        gt_classes=[np.zeros(len(b), dtype=np.int64) for b in true_boxes],
        max_detections=max([len(b) for b in pred_boxes] + [1]),
    )


def froc(
    scans: Sequence[ScanBoxes], iou_threshold: float = 0.1, fp_rates: Sequence[float] = FP_RATES
) -> dict[str, Any]:
    """FROC: ``sensitivity`` at each of ``fp_rates`` false positives per scan, their mean ``froc``, and the
    curve points (``curve_fp_per_scan``, ``curve_sensitivity``). ValueError without scans or true boxes."""
    if not scans:
        raise ValueError("FROC needs at least one scan")
    results = _matched(scans, [iou_threshold])
    n_true = sum(_boxes(s.true_boxes, "true boxes").shape[0] for s in scans)
    if n_true == 0:
        raise ValueError("FROC needs at least one true box (sensitivity is undefined otherwise)")
    scores, hits = [], []
    for result in results:
        if 0 in result and result[0]["dtScores"].size:
            scores.append(np.asarray(result[0]["dtScores"], dtype=np.float64))
            hits.append(np.asarray(result[0]["dtMatches"][0], dtype=bool))
    all_scores = np.concatenate(scores) if scores else np.zeros(0)
    all_hits = np.concatenate(hits) if hits else np.zeros(0, dtype=bool)
    order = np.argsort(-all_scores, kind="mergesort")
    all_scores, all_hits = all_scores[order], all_hits[order]
    # a cut keeps every prediction with score >= s: evaluate only at the end of each run of equal scores
    last_of_tie = np.r_[all_scores[1:] != all_scores[:-1], True] if all_scores.size else np.zeros(0, dtype=bool)
    tp = np.cumsum(all_hits)[last_of_tie]
    fp = np.cumsum(~all_hits)[last_of_tie]
    sensitivity = np.r_[0.0, tp / n_true]
    fp_per_scan = np.r_[0.0, fp / len(scans)]
    at = [float(sensitivity[fp_per_scan <= rate].max()) for rate in fp_rates]
    return {
        "fp_rates": list(fp_rates),
        "sensitivity": at,
        "froc": float(np.mean(at)),
        "n_scans": len(scans),
        "n_true": int(n_true),
        "curve_fp_per_scan": fp_per_scan.tolist(),
        "curve_sensitivity": sensitivity.tolist(),
    }


def mean_average_precision(scans: Sequence[ScanBoxes], iou_threshold: float = 0.1) -> dict[str, float]:
    """AP at ``iou_threshold`` of the single lesion class (so mAP = AP), by MONAI's ``COCOMetric`` (101-point
    interpolated precision, COCO's), with its average recall beside it."""
    from monai.apps.detection.metrics.coco import COCOMetric

    if not scans:
        raise ValueError("mAP needs at least one scan")
    max_det = max([_boxes(s.pred_boxes, "predicted boxes").shape[0] for s in scans] + [1])
    metric = COCOMetric(
        classes=["lesion"],
        iou_list=[iou_threshold],
        iou_range=(iou_threshold, iou_threshold + 0.05, 0.05),
        max_detection=[max_det],
        per_class=False,
        verbose=False,
    )
    results = _matched(scans, metric.get_iou_thresholds())
    monai_log = logging.getLogger("monai.apps.detection.metrics.coco")
    previous = monai_log.level
    monai_log.setLevel(logging.ERROR)  # "no results found" is a warning there, an AP of 0 here
    try:
        values, _ = metric(results)
    finally:
        monai_log.setLevel(previous)
    ap_key = next(k for k in values if k.startswith(f"AP_IoU_{iou_threshold:.2f}_"))
    ar_key = next((k for k in values if k.startswith("mAR_")), None)
    return {
        "map": float(values[ap_key]),
        "iou_threshold": iou_threshold,
        "mean_recall": float(values[ar_key]) if ar_key else float("nan"),
    }
