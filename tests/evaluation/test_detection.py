"""FROC and mAP on scans whose answer is worked out by hand."""

from __future__ import annotations

import pytest

from shared.evaluation.detection import FP_RATES, ScanBoxes, froc, mean_average_precision

NODULE = [10, 10, 10, 20, 20, 20]
NEAR = [11, 11, 11, 21, 21, 21]  # IoU 729 / 1271 with NODULE
FAR = [50, 50, 50, 60, 60, 60]


def test_perfect_detector() -> None:
    scans = [ScanBoxes([NODULE], [0.9], [NODULE]), ScanBoxes([FAR], [0.8], [FAR])]
    assert froc(scans)["froc"] == 1.0
    assert mean_average_precision(scans)["map"] == pytest.approx(1.0)


def test_froc_hand_computed() -> None:
    # scan 1: a hit (0.9) and a false positive (0.6); scan 2: a false positive (0.8) and a miss of its nodule,
    # then a hit at 0.3. Ranked: 0.9 hit, 0.8 fp, 0.6 fp, 0.3 hit; 2 true boxes over 2 scans.
    scans = [
        ScanBoxes([NEAR, FAR], [0.9, 0.6], [NODULE]),
        ScanBoxes([FAR, NODULE], [0.8, 0.3], [NODULE]),
    ]
    result = froc(scans)
    assert result["curve_fp_per_scan"] == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert result["curve_sensitivity"] == [0.0, 0.5, 0.5, 0.5, 1.0]
    # at <= 1/8, 1/4: 0.5; 1/2: 0.5; at 1 fp/scan and above: 1.0
    assert result["sensitivity"] == [0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert result["froc"] == pytest.approx((3 * 0.5 + 4 * 1.0) / len(FP_RATES))


def test_iou_threshold_decides_a_hit() -> None:
    shifted = [15, 15, 15, 25, 25, 25]  # IoU 125 / 1875 = 0.067 with NODULE
    scans = [ScanBoxes([shifted], [0.9], [NODULE])]
    assert froc(scans, iou_threshold=0.1)["froc"] == 0.0
    assert froc(scans, iou_threshold=0.05)["froc"] == 1.0
    assert mean_average_precision(scans, 0.1)["map"] == 0.0


def test_map_hand_computed() -> None:
    # one hit at full precision up to recall 1/2, then nothing: 101-point interpolation gives 51/101
    scans = [
        ScanBoxes([NODULE, FAR], [0.9, 0.8], [NODULE]),
        ScanBoxes([[0, 0, 0, 5, 5, 5]], [0.7], [FAR]),
    ]
    assert mean_average_precision(scans)["map"] == pytest.approx(51 / 101)


def test_scan_without_predictions_or_truth() -> None:
    scans = [ScanBoxes([], [], [NODULE]), ScanBoxes([FAR], [0.5], [])]
    result = froc(scans)
    assert result["froc"] == 0.0 and result["n_true"] == 1


def test_bad_boxes_are_value_errors() -> None:
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        froc([ScanBoxes([[1, 2, 3]], [0.5], [NODULE])])
    with pytest.raises(ValueError, match="maximum corner"):
        froc([ScanBoxes([[5, 5, 5, 1, 1, 1]], [0.5], [NODULE])])
    with pytest.raises(ValueError, match="scores"):
        froc([ScanBoxes([NODULE], [0.5, 0.4], [NODULE])])
    with pytest.raises(ValueError, match="true box"):
        froc([ScanBoxes([NODULE], [0.5], [])])
