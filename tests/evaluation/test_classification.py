"""Classification metrics against independent computations: sklearn's AUC, DeLong's variance from its
O(m n) definition, a bootstrap, hand-computed Wilson intervals, thresholds and calibration bins."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from shared.evaluation.classification import (
    choose_threshold,
    classification_report,
    delong_auc_ci,
    delong_paired_test,
    expected_calibration_error,
    operating_point,
    reliability_bins,
    roc_auc,
    wilson_interval,
)


def synthetic(n: int = 120, seed: int = 0, ties: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels (~30 % positive) and two correlated scorers of different strength."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    shared = rng.normal(size=n)
    a = 1.2 * y + shared + 0.5 * rng.normal(size=n)
    b = 0.6 * y + shared + 0.5 * rng.normal(size=n)
    if ties:
        a, b = np.round(a), np.round(b)
    return y, a, b


def placements(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components straight from the definition psi(x, y) = 1, 1/2, 0."""
    pos, neg = s[y == 1], s[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    return psi.mean(1), psi.mean(0)


@pytest.mark.parametrize("ties", [False, True])
def test_auc_equals_sklearn(ties: bool) -> None:
    y, a, _ = synthetic(ties=ties)
    assert roc_auc(y, a) == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert delong_auc_ci(y, a).auc == pytest.approx(roc_auc_score(y, a), abs=1e-12)


def test_hand_computed_auc_with_a_tie() -> None:
    # positives 0.8, 0.4; negatives 0.4, 0.1: pairs 1 + 1 + 0.5 + 1 of 4
    assert roc_auc([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.1]) == pytest.approx(3.5 / 4)


@pytest.mark.parametrize("ties", [False, True])
def test_delong_variance_and_covariance_equal_the_definition(ties: bool) -> None:
    y, a, b = synthetic(ties=ties)
    m, n = int(y.sum()), int((1 - y).sum())
    v10a, v01a = placements(y, a)
    v10b, v01b = placements(y, b)
    var_a = np.var(v10a, ddof=1) / m + np.var(v01a, ddof=1) / n
    var_b = np.var(v10b, ddof=1) / m + np.var(v01b, ddof=1) / n
    cov = np.cov(v10a, v10b)[0, 1] / m + np.cov(v01a, v01b)[0, 1] / n
    assert delong_auc_ci(y, a).variance == pytest.approx(var_a, rel=1e-10)
    test = delong_paired_test(y, a, b)
    assert test.variance == pytest.approx(var_a + var_b - 2 * cov, rel=1e-10)
    z = (v10a.mean() - v10b.mean()) / math.sqrt(var_a + var_b - 2 * cov)
    assert test.z == pytest.approx(z, rel=1e-10)
    assert test.p_value == pytest.approx(2 * stats.norm.sf(abs(z)), rel=1e-10)


def test_delong_variance_agrees_with_a_bootstrap() -> None:
    y, a, _ = synthetic(n=300, seed=3)
    rng = np.random.default_rng(1)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    boot = []
    for _ in range(2000):  # stratified, as the variance is conditional on the class sizes
        idx = np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size)]
        boot.append(roc_auc_score(y[idx], a[idx]))
    interval = delong_auc_ci(y, a)
    assert interval.variance == pytest.approx(np.var(boot), rel=0.15)
    assert interval.low < interval.auc < interval.high
    assert interval.high - interval.low == pytest.approx(2 * 1.959964 * math.sqrt(interval.variance), rel=1e-6)


def test_paired_test_detects_a_better_model_and_not_an_identical_one() -> None:
    y, a, b = synthetic(n=400, seed=5)
    better = delong_paired_test(y, a, b)
    assert better.difference > 0 and better.p_value < 0.01
    assert better.low > 0
    same = delong_paired_test(y, a, a)
    assert (same.difference, same.z, same.p_value) == (0.0, 0.0, 1.0)
    # a strictly monotone transform ranks identically: same AUC, nothing to test
    assert delong_paired_test(y, a, np.exp(a / 3)).p_value == 1.0
    # the test is antisymmetric
    swapped = delong_paired_test(y, b, a)
    assert swapped.z == pytest.approx(-better.z) and swapped.p_value == pytest.approx(better.p_value)


def test_bad_input_is_a_clear_value_error() -> None:
    with pytest.raises(ValueError, match="positive and one negative"):
        roc_auc([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="0 \\(negative\\) or 1"):
        roc_auc([0, 2], [0.2, 0.3])
    with pytest.raises(ValueError, match="one value per case"):
        delong_auc_ci([0, 1], [0.2])
    with pytest.raises(ValueError, match="finite"):
        roc_auc([0, 1], [0.2, math.nan])
    with pytest.raises(ValueError, match="probabilities"):
        expected_calibration_error([0, 1], [0.2, 1.5])


def test_wilson_interval_hand_computed() -> None:
    # 8/10 at 95 %: centre (8 + z^2/2) / (10 + z^2), half-width z sqrt(10*.8*.2 + z^2/4) / (10 + z^2)
    low, high = wilson_interval(8, 10)
    assert (low, high) == pytest.approx((0.49016, 0.94330), abs=5e-5)
    assert wilson_interval(0, 5)[0] == 0.0 and 0 < wilson_interval(0, 5)[1] < 0.5
    assert wilson_interval(5, 5)[1] == pytest.approx(1.0) and wilson_interval(5, 5)[0] > 0.5
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_thresholds_youden_and_target_sensitivity() -> None:
    y = [0, 0, 0, 1, 0, 1, 1, 1]
    s = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    # t = 0.4: sens 4/4, spec 3/4 (J 0.75); t = 0.6: sens 3/4, spec 4/4 (J 0.75): the highest of the tie
    assert choose_threshold(y, s, "youden") == 0.6
    assert choose_threshold(y, s, "sensitivity", target_sensitivity=1.0) == 0.4
    assert choose_threshold(y, s, "sensitivity", target_sensitivity=0.5) == 0.7
    point = operating_point(y, s, 0.4)
    assert (point["tp"], point["fn"], point["tn"], point["fp"]) == (4, 0, 3, 1)
    assert point["sensitivity"] == 1.0 and point["specificity"] == 0.75 and point["ppv"] == 0.8
    assert (point["sensitivity_ci_low"], point["sensitivity_ci_high"]) == pytest.approx(wilson_interval(4, 4))


def test_reliability_bins_and_ece_hand_computed() -> None:
    y = [0, 1, 1, 1, 0, 0]
    p = [0.05, 0.15, 0.95, 1.0, 0.55, 0.45]
    rows = reliability_bins(y, p, n_bins=2)
    assert [r["count"] for r in rows] == [3, 3]
    assert rows[0]["confidence"] == pytest.approx((0.05 + 0.15 + 0.45) / 3)
    assert rows[0]["frequency"] == pytest.approx(1 / 3)
    assert rows[1]["frequency"] == pytest.approx(2 / 3)
    expected = 0.5 * abs(1 / 3 - 0.65 / 3) + 0.5 * abs(2 / 3 - 2.5 / 3)
    assert expected_calibration_error(y, p, n_bins=2) == pytest.approx(expected)
    # perfectly calibrated in every bin: ECE 0; ten bins, empty ones nan and left out
    assert expected_calibration_error([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.0
    assert math.isnan(reliability_bins([0, 1], [0.5, 0.5])[0]["frequency"])


def test_report_carries_every_figure() -> None:
    y, a, _ = synthetic()
    probs = 1 / (1 + np.exp(-a))
    report = classification_report(y, probs, threshold=0.5)
    for key in ("auc", "auc_ci_low", "auc_ci_high", "sensitivity", "specificity", "ece", "reliability"):
        assert key in report
    assert report["auc"] == pytest.approx(roc_auc_score(y, probs))
