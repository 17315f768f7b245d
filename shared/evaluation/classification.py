"""Binary classification quality: ROC AUC with DeLong's interval, the paired DeLong test, an operating point
chosen on validation with Wilson intervals at it, and calibration (reliability bins, ECE).

Pure functions of ``(labels, scores)`` numpy-compatible sequences, so the promotion gate, the benchmark and
``voxelflow evaluate`` share one definition. Conventions, fixed once here:

* ``labels`` are 0/1 (1 = the positive finding), ``scores`` any real numbers where larger means "more
  likely positive" (probabilities for the calibration functions);
* a case is called positive when ``score >= threshold``;
* ties between a positive and a negative score count one half (the Mann-Whitney definition of the AUC,
  which is what ``sklearn.metrics.roc_auc_score`` computes).

Why DeLong and not a bootstrap: DeLong, DeLong & Clarke-Pearson (1988) give the variance of the empirical
AUC, and the covariance of two AUCs measured on the same cases, in closed form from the structural
components (placement values) of each case; it is exact in the U-statistic sense, deterministic (a gate
decision must not depend on a resampling seed), and the covariance is what makes the *paired* comparison
of two models on one test set much more powerful than comparing two unpaired intervals. The midrank
algorithm is Sun & Xu (2014), "Fast implementation of DeLong's algorithm", IEEE SPL 21(11), O(n log n).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy import stats

Z95 = float(stats.norm.ppf(0.975))


def _binary(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) must have one value per case")
    if not np.all(np.isin(y, (0, 1))):
        raise ValueError("labels must be 0 (negative) or 1 (positive)")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    return y.astype(np.int64), s


def _both_classes(y: np.ndarray) -> None:
    if y.sum() == 0 or y.sum() == y.size:
        raise ValueError("the AUC needs at least one positive and one negative case")


def _midrank(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    n = x.size
    ranks = np.empty(n, dtype=np.float64)
    i = 0
    while i < n:
        j = i
        while j < n and sorted_x[j] == sorted_x[i]:
            j += 1
        ranks[i:j] = 0.5 * (i + j - 1) + 1
        i = j
    out = np.empty(n, dtype=np.float64)
    out[order] = ranks
    return out


def _structural_components(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per model k (rows of ``scores``): AUC_k, V10 (one per positive) and V01 (one per negative).

    V10[i] is the share of negatives a positive i outranks (ties 1/2), V01[j] the share of positives that
    outrank negative j; the AUC is the mean of either (Sun & Xu's midrank form).
    """
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    aucs, v10s, v01s = [], [], []
    for k in range(scores.shape[0]):
        tx, ty = _midrank(pos[k]), _midrank(neg[k])
        tz = _midrank(np.concatenate([pos[k], neg[k]]))
        aucs.append((tz[:m].sum() / m - (m + 1) / 2.0) / n)
        v10s.append((tz[:m] - tx) / n)
        v01s.append(1.0 - (tz[m:] - ty) / m)
    return np.asarray(aucs), np.asarray(v10s), np.asarray(v01s)


def _delong_covariance(v10: np.ndarray, v01: np.ndarray) -> np.ndarray:
    """DeLong's covariance matrix of the AUCs: S10/m + S01/n (sample covariances over cases, ddof 1)."""
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((v10.shape[0],) * 2)
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((v01.shape[0],) * 2)
    return np.asarray(s10 / m + s01 / n)


def roc_auc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """The empirical ROC AUC (Mann-Whitney, ties 1/2). ValueError without both classes."""
    y, s = _binary(labels, scores)
    _both_classes(y)
    return float(_structural_components(y, s[None])[0][0])


@dataclass(frozen=True)
class AucInterval:
    auc: float
    variance: float  # DeLong's
    low: float
    high: float
    n_positive: int
    n_negative: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "auc": self.auc,
            "auc_variance": self.variance,
            "auc_ci_low": self.low,
            "auc_ci_high": self.high,
            "n_positive": self.n_positive,
            "n_negative": self.n_negative,
        }


def delong_auc_ci(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, level: float = 0.95
) -> AucInterval:
    """AUC with DeLong's variance and the normal (Wald) interval ``auc +- z * sqrt(var)``, clipped to [0, 1]
    (what pROC's ``ci.auc(method="delong")`` reports)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    y, s = _binary(labels, scores)
    _both_classes(y)
    aucs, v10, v01 = _structural_components(y, s[None])
    var = float(_delong_covariance(v10, v01)[0, 0])
    z = float(stats.norm.ppf(0.5 + level / 2))
    half = z * math.sqrt(max(var, 0.0))
    auc = float(aucs[0])
    return AucInterval(auc, var, max(0.0, auc - half), min(1.0, auc + half), int(y.sum()), int(y.size - y.sum()))


@dataclass(frozen=True)
class PairedDelong:
    auc_a: float
    auc_b: float
    difference: float  # auc_a - auc_b
    variance: float  # of the difference: var_a + var_b - 2 cov
    z: float
    p_value: float  # two-sided
    low: float  # 95 % interval of the difference
    high: float

    def as_dict(self) -> dict[str, float]:
        return {
            "auc_a": self.auc_a,
            "auc_b": self.auc_b,
            "auc_difference": self.difference,
            "difference_variance": self.variance,
            "z": self.z,
            "p_value": self.p_value,
            "difference_ci_low": self.low,
            "difference_ci_high": self.high,
        }


def delong_paired_test(
    labels: Sequence[int] | np.ndarray,
    scores_a: Sequence[float] | np.ndarray,
    scores_b: Sequence[float] | np.ndarray,
) -> PairedDelong:
    """DeLong's test of H0 AUC_a = AUC_b for two models scored on the *same* cases (the gate's comparison).

    Two-sided p from ``z = (A - B) / sqrt(var_A + var_B - 2 cov_AB)``. When the difference has zero
    variance (identical rankings) there is nothing to test: z = 0 and p = 1 if the AUCs are equal.
    """
    y, a = _binary(labels, scores_a)
    _, b = _binary(labels, scores_b)
    _both_classes(y)
    aucs, v10, v01 = _structural_components(y, np.stack([a, b]))
    cov = _delong_covariance(v10, v01)
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    if var <= 1e-15:
        z = 0.0 if abs(diff) < 1e-12 else math.copysign(math.inf, diff)
        p = 1.0 if z == 0.0 else 0.0
        half = 0.0
    else:
        z = diff / math.sqrt(var)
        p = float(2 * stats.norm.sf(abs(z)))
        half = Z95 * math.sqrt(var)
    return PairedDelong(float(aucs[0]), float(aucs[1]), diff, max(var, 0.0), z, p, diff - half, diff + half)


# --- the operating point --------------------------------------------------------------------------------


def wilson_interval(successes: int, total: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval for a binomial proportion; (nan, nan) when ``total`` is 0.

    Why Wilson: with the 22 positives of a validation set, the Wald interval of a sensitivity near 1
    collapses to zero width or leaves [0, 1]; Wilson's stays inside and keeps close to nominal coverage.
    """
    if total < 0 or not 0 <= successes <= total:
        raise ValueError(f"need 0 <= successes <= total, got {successes}/{total}")
    if total == 0:
        return math.nan, math.nan
    z = float(stats.norm.ppf(0.5 + level / 2))
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def choose_threshold(
    labels: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    method: Literal["youden", "sensitivity"] = "youden",
    target_sensitivity: float = 0.9,
) -> float:
    """The threshold to call a case positive (``score >= t``), chosen on validation cases.

    ``youden``: maximises sensitivity + specificity - 1 (ties: the highest such threshold, i.e. the fewest
    positive calls); ``sensitivity``: the highest threshold whose sensitivity is at least
    ``target_sensitivity`` (the screening choice: a fixed share of the findings is not missed). The
    candidates are the observed scores, so the result is always one of them.
    """
    y, s = _binary(labels, scores)
    _both_classes(y)
    if method not in ("youden", "sensitivity"):
        raise ValueError(f"unknown threshold method {method!r}: youden or sensitivity")
    if not 0 < target_sensitivity <= 1:
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    candidates = np.unique(s)[::-1]  # high to low: the first hit among ties is the highest threshold
    pos, neg = s[y == 1], s[y == 0]
    best_t, best_j = float(candidates[0]), -math.inf
    for t in candidates:
        sens = float((pos >= t).mean())
        if method == "sensitivity":
            if sens >= target_sensitivity - 1e-12:
                return float(t)
            continue
        j = sens + float((neg < t).mean()) - 1
        if j > best_j + 1e-12:
            best_t, best_j = float(t), j
    return best_t


def operating_point(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, threshold: float, level: float = 0.95
) -> dict[str, float | int]:
    """Sensitivity, specificity, PPV, NPV at ``threshold`` with Wilson intervals and the confusion counts."""
    y, s = _binary(labels, scores)
    called = s >= threshold
    tp = int(np.sum(called & (y == 1)))
    fn = int(np.sum(~called & (y == 1)))
    tn = int(np.sum(~called & (y == 0)))
    fp = int(np.sum(called & (y == 0)))
    out: dict[str, float | int] = {"threshold": float(threshold), "tp": tp, "fp": fp, "tn": tn, "fn": fn}
    for name, hit, total in (
        ("sensitivity", tp, tp + fn),
        ("specificity", tn, tn + fp),
        ("ppv", tp, tp + fp),
        ("npv", tn, tn + fn),
    ):
        out[name] = hit / total if total else math.nan
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = wilson_interval(hit, total, level)
    return out


# --- calibration ----------------------------------------------------------------------------------------


def reliability_bins(
    labels: Sequence[int] | np.ndarray, probabilities: Sequence[float] | np.ndarray, n_bins: int = 10
) -> list[dict[str, float | int]]:
    """The reliability curve: equal-width bins of the predicted probability of the positive class.

    Bin b holds probabilities in [b/n, (b+1)/n) (the last bin includes 1.0); each row gives its range, the
    case count, the mean predicted probability (``confidence``) and the observed positive rate
    (``frequency``; nan for an empty bin). A calibrated model has frequency = confidence in every bin.
    """
    y, p = _binary(labels, probabilities)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if np.any((p < 0) | (p > 1)):
        raise ValueError("calibration needs probabilities in [0, 1] (apply the sigmoid or softmax first)")
    index = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    rows: list[dict[str, float | int]] = []
    for b in range(n_bins):
        inside = index == b
        count = int(inside.sum())
        rows.append(
            {
                "low": b / n_bins,
                "high": (b + 1) / n_bins,
                "count": count,
                "confidence": float(p[inside].mean()) if count else math.nan,
                "frequency": float(y[inside].mean()) if count else math.nan,
            }
        )
    return rows


def expected_calibration_error(
    labels: Sequence[int] | np.ndarray, probabilities: Sequence[float] | np.ndarray, n_bins: int = 10
) -> float:
    """ECE over :func:`reliability_bins`: sum over bins of (count / N) * |frequency - confidence|.

    This is the binary (positive-class) form of Guo et al. (2017)'s ECE, the one that reads directly off
    the reliability plot; the top-label form differs for probabilities below 0.5.
    """
    rows = reliability_bins(labels, probabilities, n_bins)
    total = sum(int(r["count"]) for r in rows)
    return float(
        sum(int(r["count"]) / total * abs(float(r["frequency"]) - float(r["confidence"])) for r in rows if r["count"])
    )


def classification_report(
    labels: Sequence[int] | np.ndarray,
    probabilities: Sequence[float] | np.ndarray,
    threshold: float,
    n_bins: int = 10,
) -> dict[str, Any]:
    """Everything the benchmark and the gate report for one model on one test set, at a threshold chosen
    beforehand on validation."""
    return {
        **delong_auc_ci(labels, probabilities).as_dict(),
        **operating_point(labels, probabilities, threshold),
        "ece": expected_calibration_error(labels, probabilities, n_bins),
        "reliability": reliability_bins(labels, probabilities, n_bins),
    }
