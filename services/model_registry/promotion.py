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

Optional third condition (``max_robustness_drop``, off by default): the candidate may not be much less
robust than the champion. Robustness is the version's robustness report (``robustness/robustness.json``,
the Dice lost per corruption and level, written by ``voxelflow evaluate --robustness``); the candidate is
refused when its mean drop over the levels both were measured on exceeds the champion's by more than
``max_robustness_drop``, when it lacks a level the champion has, or when it has no report (the option is
on: an unmeasured candidate cannot be shown to be robust). A champion without a report is not compared
(the statistics say so).

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
    #: how much larger the candidate's mean robustness drop may be than the champion's; None = not checked
    max_robustness_drop: float | None = None


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


def robustness_drops(report: Mapping[str, Any]) -> dict[tuple[str, int], float]:
    """``{(corruption, level): drop}`` of a robustness report (``robustness/robustness.json``, written by
    ``voxelflow evaluate --robustness``). ValueError when it is not such a report (or a drop is undefined)."""
    rows = report.get("rows")
    if not isinstance(rows, list) or not rows:
        raise ValueError(str(report.get("error") or "the robustness report has no rows"))
    drops: dict[tuple[str, int], float] = {}
    for row in rows:
        try:
            key, drop = (str(row["corruption"]), int(row["level"])), float(row["drop"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"a robustness report row is not {{corruption, level, drop}}: {row!r}") from exc
        if not math.isfinite(drop):
            raise ValueError(f"the robustness drop of {key[0]} level {key[1]} is undefined")
        drops[key] = drop
    return drops


def robustness_check(
    max_drop: float | None,
    candidate_report: Mapping[str, Any] | None,
    champion_report: Mapping[str, Any] | None,
    has_champion: bool,
) -> tuple[list[str], dict[str, Any] | None]:
    """The refusal reasons of the robustness condition (empty: it passes) and what it compared.

    Why the report and not the ``robustness_mean_drop`` metric: a mean over different corruptions, levels or
    cases is not comparable, so the two versions are compared on the (corruption, level) rows they share, and
    the candidate must have been measured on every row the champion was (else a candidate evaluated only on
    its easiest corruption would pass) and on the same cases when both reports name them.
    """
    if max_drop is None:
        return [], None
    statistics: dict[str, Any] = {"max_robustness_drop": max_drop, "compared": False}
    if not candidate_report:
        return [
            "the robustness gate is on but the candidate has no robustness report (robustness/robustness.json): "
            "run `voxelflow evaluate --robustness` on it first"
        ], statistics
    try:
        candidate = robustness_drops(candidate_report)
    except ValueError as exc:
        return [f"the candidate's robustness report is unusable: {exc}"], statistics
    statistics["candidate_mean_drop"] = float(np.mean(list(candidate.values())))
    if not has_champion or not champion_report:
        statistics["champion_mean_drop"] = None
        return [], statistics  # nothing to compare with: the other conditions decide
    try:
        champion = robustness_drops(champion_report)
    except ValueError:
        statistics["champion_mean_drop"] = None
        return [], statistics  # the champion's report is broken: not the candidate's fault; reported, not compared
    statistics["champion_mean_drop"] = float(np.mean(list(champion.values())))
    missing = sorted(set(champion) - set(candidate))
    if missing:
        shown = ", ".join(f"{name} {level}" for name, level in missing[:8])
        return [
            f"the candidate's robustness report lacks {len(missing)} corruption level(s) the champion was measured "
            f"on ({shown}): evaluate it with the same --corruptions and --robustness-levels"
        ], statistics
    cases_a, cases_b = candidate_report.get("case_ids"), champion_report.get("case_ids")
    if cases_a is not None and cases_b is not None and sorted(cases_a) != sorted(cases_b):
        return [
            "the candidate's and the champion's robustness reports were made on different cases: evaluate both on "
            "the same folder and --robustness-cases"
        ], statistics
    common = sorted(champion)
    candidate_drop = float(np.mean([candidate[k] for k in common]))
    champion_drop = float(np.mean([champion[k] for k in common]))
    excess = candidate_drop - champion_drop
    statistics.update(
        compared=True,
        levels_compared=len(common),
        paired_candidate_drop=candidate_drop,
        paired_champion_drop=champion_drop,
    )
    if excess > max_drop:
        return [
            f"less robust than the champion: mean Dice drop under corruption {candidate_drop:.4f} against the "
            f"champion's {champion_drop:.4f} on {len(common)} corruption levels (+{excess:.4f} > the allowed "
            f"{max_drop:.4f})"
        ], statistics
    return [], statistics


def decide_promotion(
    candidate: Mapping[str, float] | None,
    champion: Mapping[str, float] | None,
    config: GateConfig = GateConfig(),
    candidate_robustness: Mapping[str, Any] | None = None,
    champion_robustness: Mapping[str, Any] | None = None,
) -> PromotionDecision:
    """Decision, with every reason for a refusal and the statistics it rests on.

    ``candidate``/``champion`` map case IDs to per-case mean Dice; ``champion`` None means no version
    holds the champion alias yet. ``candidate`` None or empty (never evaluated) is refused. The robustness
    reports (each version's ``robustness/robustness.json``, None when it has none) matter only with
    ``config.max_robustness_drop`` (:func:`robustness_check`).
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
    robustness_reasons, robustness = robustness_check(
        config.max_robustness_drop, candidate_robustness, champion_robustness, champion is not None
    )
    reasons += robustness_reasons
    if robustness is not None:
        statistics["robustness"] = robustness
    if champion is None:
        statistics["champion"] = None
        promote = not reasons
        if promote:
            reasons.append("no champion yet: the Dice threshold is the only condition")
        return PromotionDecision(promote, reasons, statistics)

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
