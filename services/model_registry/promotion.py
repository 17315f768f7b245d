"""The promotion gate: may a candidate model version become the champion? Pure; no MLflow here.

Two conditions, both on the held-out test set (``evaluation/per_case.json`` of each version):

1. its mean per-case Dice reaches ``min_dice`` (an absolute quality floor);
2. it is not significantly worse than the current champion: a one-sided paired Wilcoxon signed-rank
   test (``scipy.stats.wilcoxon``) on the per-case Dice of the cases both were evaluated on, with
   H1 "candidate < champion - margin", must not reject at ``alpha``.

Why Wilcoxon: per-case Dice is bounded and skewed (a few failed cases), so a t-test's normality is a
poor assumption; pairing removes the between-case variance that dwarfs model differences. Why
"not worse" rather than "better": a retrain on more data that is statistically indistinguishable must
still be promotable, while a real regression is stopped.

Edge cases, decided explicitly: no champion yet → only the floor applies; fewer than ``min_cases``
paired cases → refused (nothing can be concluded; an admin may force); every difference zero →
not worse (p = 1); zero differences are dropped (``zero_method="wilcox"``) and tied magnitudes use
the normal approximation with tie correction (``method="auto"`` chooses it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class GateConfig:
    min_dice: float = 0.8
    alpha: float = 0.05
    min_cases: int = 5
    margin: float = 0.0  # non-inferiority margin in Dice: candidate may be this much worse and still pass


@dataclass
class PromotionDecision:
    promote: bool
    reasons: list[str]
    statistics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: an undefined statistic (NaN, e.g. the mean Dice of a champion never evaluated) is None."""
        return {"promote": self.promote, "reasons": self.reasons, "statistics": _json_safe(self.statistics)}


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


def paired_wilcoxon(
    candidate: Mapping[str, float], champion: Mapping[str, float], margin: float = 0.0
) -> dict[str, Any]:
    """One-sided paired test "candidate worse than champion - margin" on the cases both have.

    Returns ``n_paired``, ``n_nonzero``, ``mean_difference`` (candidate - champion), ``statistic`` and
    ``p_value`` (1.0 and statistic None when no difference is non-zero: nothing suggests "worse").
    """
    common = sorted(set(candidate) & set(champion))
    differences = np.array([candidate[c] - champion[c] + margin for c in common], dtype=float)
    result: dict[str, Any] = {
        "n_paired": len(common),
        "n_nonzero": int(np.count_nonzero(differences)),
        "mean_difference": float(np.mean(differences) - margin) if common else math.nan,
        "statistic": None,
        "p_value": 1.0,
    }
    if result["n_nonzero"] == 0:
        return result
    test = stats.wilcoxon(differences, zero_method="wilcox", alternative="less", method="auto")
    result["statistic"] = float(test.statistic)
    result["p_value"] = float(test.pvalue)
    return result


def decide_promotion(
    candidate: Mapping[str, float] | None,
    champion: Mapping[str, float] | None,
    config: GateConfig = GateConfig(),
) -> PromotionDecision:
    """Decision, with every reason for a refusal and the statistics it rests on.

    ``candidate``/``champion`` map case IDs to per-case mean Dice; ``champion`` None means no version
    holds the champion alias yet. ``candidate`` None or empty (never evaluated) is refused.
    """
    if not candidate:
        return PromotionDecision(False, ["the candidate has no held-out per-case Dice (evaluation/per_case.json)"])
    values = [float(v) for v in candidate.values()]
    if not all(math.isfinite(v) for v in values):
        return PromotionDecision(False, ["the candidate's per-case Dice contains undefined values"])
    mean_dice = float(np.mean(values))
    statistics: dict[str, Any] = {
        "candidate_mean_dice": mean_dice,
        "candidate_cases": len(values),
        "min_dice": config.min_dice,
        "alpha": config.alpha,
        "margin": config.margin,
    }
    reasons: list[str] = []
    if mean_dice < config.min_dice:
        reasons.append(f"mean held-out Dice {mean_dice:.4f} is below the threshold {config.min_dice:.4f}")
    if champion is None:
        statistics["champion"] = None
        if not reasons:
            reasons.append("no champion yet: the Dice threshold is the only condition")
        return PromotionDecision(mean_dice >= config.min_dice, reasons, statistics)

    statistics["champion_mean_dice"] = float(np.mean(list(champion.values()))) if champion else math.nan
    test = paired_wilcoxon(candidate, champion, config.margin)
    statistics["wilcoxon"] = test
    if test["n_paired"] < config.min_cases:
        reasons.append(
            f"only {test['n_paired']} cases evaluated for both candidate and champion; at least "
            f"{config.min_cases} are needed to compare them (were they evaluated on the same test set?)"
        )
    elif test["p_value"] < config.alpha:
        reasons.append(
            f"significantly worse than the champion on {test['n_paired']} paired cases (one-sided Wilcoxon "
            f"p = {test['p_value']:.4g} < {config.alpha}; mean difference {test['mean_difference']:+.4f})"
        )
    promote = not reasons
    if promote:
        reasons.append(
            f"mean Dice {mean_dice:.4f} >= {config.min_dice:.4f} and not significantly worse than the champion "
            f"(p = {test['p_value']:.4g}, {test['n_paired']} paired cases)"
        )
    return PromotionDecision(promote, reasons, statistics)
