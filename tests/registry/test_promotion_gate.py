"""The pure promotion gate: threshold, paired Wilcoxon against the champion, and its edge cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.model_registry.promotion import GateConfig, decide_promotion, paired_wilcoxon

GATE = GateConfig(min_dice=0.7, alpha=0.05, min_cases=5)


def cases(values: list[float]) -> dict[str, float]:
    return {f"case-{i:03d}": v for i, v in enumerate(values)}


def test_no_champion_only_the_threshold_applies() -> None:
    assert decide_promotion(cases([0.8, 0.75, 0.9]), None, GATE).promote
    refused = decide_promotion(cases([0.5, 0.6, 0.65]), None, GATE)
    assert not refused.promote and "below the threshold" in refused.reasons[0]
    assert refused.statistics["candidate_mean_dice"] == pytest.approx(0.5833333)


def test_never_evaluated_candidate_is_refused() -> None:
    empty: list[dict[str, float] | None] = [None, {}]
    for candidate in empty:
        decision = decide_promotion(candidate, None, GATE)
        assert not decision.promote and "per-case Dice" in decision.reasons[0]
    assert not decide_promotion(cases([0.9, float("nan")]), None, GATE).promote


def test_identical_per_case_dice_is_not_worse() -> None:
    same = cases([0.8, 0.82, 0.85, 0.79, 0.88, 0.9])
    decision = decide_promotion(same, dict(same), GATE)
    assert decision.promote
    assert decision.statistics["wilcoxon"]["p_value"] == 1.0 and decision.statistics["wilcoxon"]["n_nonzero"] == 0


def test_consistently_worse_candidate_is_refused_with_statistics() -> None:
    champion = cases(list(np.linspace(0.80, 0.90, 12)))
    candidate = {k: v - 0.03 - 0.001 * i for i, (k, v) in enumerate(champion.items())}
    decision = decide_promotion(candidate, champion, GATE)
    assert not decision.promote
    assert "significantly worse" in decision.reasons[0]
    test = decision.statistics["wilcoxon"]
    # all 12 differences negative: the exact one-sided p-value is 1 / 2**12
    assert test["p_value"] == pytest.approx(1 / 2**12) and test["n_paired"] == 12
    assert test["mean_difference"] == pytest.approx(-0.0355)
    # the same loss within a non-inferiority margin of 0.05 passes
    lenient = GateConfig(min_dice=0.7, alpha=0.05, min_cases=5, margin=0.05)
    assert decide_promotion(candidate, champion, lenient).promote


def test_better_candidate_passes_and_ties_are_handled() -> None:
    champion = cases([0.80, 0.80, 0.80, 0.80, 0.80, 0.80, 0.80, 0.80])
    candidate = cases([0.82, 0.82, 0.82, 0.82, 0.78, 0.80, 0.82, 0.82])  # tied magnitudes and a zero difference
    test = paired_wilcoxon(candidate, champion)
    assert test["n_nonzero"] == 7 and test["p_value"] > 0.9
    assert decide_promotion(candidate, champion, GATE).promote


def test_too_few_paired_cases_are_refused() -> None:
    champion = cases([0.8, 0.8, 0.8, 0.8, 0.8, 0.8])
    candidate = {"other-1": 0.9, "other-2": 0.9, "case-000": 0.9}  # different test set: one shared case
    decision = decide_promotion(candidate, champion, GATE)
    assert not decision.promote and "only 1 cases" in decision.reasons[0]
    assert decide_promotion(cases([0.9] * 6), {}, GATE).promote is False  # champion without evaluation


def test_both_failures_are_reported() -> None:
    champion = cases([0.9] * 10)
    decision = decide_promotion(cases([0.5] * 10), champion, GATE)
    assert not decision.promote and len(decision.reasons) == 2


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(min_value=0.7, max_value=1.0), min_size=6, max_size=30),
    st.floats(min_value=0.0, max_value=0.2),
)
def test_uniform_improvement_never_refused(champion_values: list[float], gain: float) -> None:
    """A candidate at least as good as a passing champion on every case is always promoted."""
    champion = cases(champion_values)
    candidate = {k: min(1.0, v + gain) for k, v in champion.items()}
    decision = decide_promotion(candidate, champion, GATE)
    assert decision.promote, decision.reasons
    assert 0.0 <= decision.statistics["wilcoxon"]["p_value"] <= 1.0


def test_champion_never_evaluated_refuses_and_the_decision_is_valid_json() -> None:
    """A champion promoted by force without per-case Dice: nothing to compare with, so the gate refuses, and
    its undefined statistics (NaN mean) must still serialise as strict JSON (the REST API answered 500)."""
    import json

    decision = decide_promotion(cases([0.8, 0.82, 0.85, 0.79, 0.88, 0.9]), {}, GATE)
    assert not decision.promote and "at least 5 are needed" in decision.reasons[0]
    encoded = json.dumps(decision.to_dict(), allow_nan=False)
    assert json.loads(encoded)["statistics"]["champion_mean_dice"] is None


ROBUST = GateConfig(min_dice=0.7, alpha=0.05, min_cases=5, max_robustness_drop=0.05)
GOOD_CASES = cases([0.8, 0.82, 0.85, 0.79, 0.88, 0.9])


def report(drops: dict[tuple[str, int], float], case_ids: list[str] | None = None) -> dict:
    """A robustness report as `voxelflow evaluate --robustness` writes it (robustness/robustness.json)."""
    rows = [{"corruption": c, "level": lv, "dice": 0.8 - d, "drop": d} for (c, lv), d in drops.items()]
    out: dict = {"clean_dice": 0.8, "rows": rows, "mean_drop": sum(drops.values()) / len(drops)}
    if case_ids is not None:
        out["case_ids"] = case_ids
    return out


def uniform(drop: float) -> dict:
    return report({("noise", 1): drop, ("noise", 5): drop, ("fgsm", 5): drop})


def test_robustness_gate_refuses_a_much_less_robust_candidate() -> None:
    refused = decide_promotion(GOOD_CASES, dict(GOOD_CASES), ROBUST, uniform(0.20), uniform(0.10))
    assert not refused.promote and "less robust than the champion" in refused.reasons[0]
    stats = refused.statistics["robustness"]
    assert stats["compared"] is True and stats["levels_compared"] == 3
    assert stats["paired_candidate_drop"] == pytest.approx(0.20) and stats["paired_champion_drop"] == pytest.approx(
        0.10
    )
    # within the allowance (+0.04 <= 0.05), or more robust: the other conditions decide
    assert decide_promotion(GOOD_CASES, dict(GOOD_CASES), ROBUST, uniform(0.14), uniform(0.10)).promote
    assert decide_promotion(GOOD_CASES, dict(GOOD_CASES), ROBUST, uniform(0.01), uniform(0.10)).promote
    # off: the same reports are not looked at
    off = decide_promotion(GOOD_CASES, dict(GOOD_CASES), GATE, uniform(0.20), uniform(0.10))
    assert off.promote and "robustness" not in off.statistics
    # a robustness refusal and a Dice refusal are both reported
    worse = {k: v - 0.05 for k, v in GOOD_CASES.items()}
    both = decide_promotion(worse, dict(GOOD_CASES), ROBUST, uniform(0.20), uniform(0.10))
    assert len(both.reasons) == 2


def test_robustness_gate_compares_the_shared_levels_only() -> None:
    # the candidate also ran a harsh extra corruption: its overall mean is much worse, but on the champion's
    # levels it is as robust, so it passes
    champion = uniform(0.10)
    candidate = report({("noise", 1): 0.10, ("noise", 5): 0.10, ("fgsm", 5): 0.10, ("pgd", 5): 0.9})
    passed = decide_promotion(GOOD_CASES, dict(GOOD_CASES), ROBUST, candidate, champion)
    assert passed.promote and passed.statistics["robustness"]["candidate_mean_drop"] > 0.25
    # measured only on the easiest corruption: refused, the missing levels named
    easy = report({("noise", 1): 0.0})
    refused = decide_promotion(GOOD_CASES, dict(GOOD_CASES), ROBUST, easy, champion)
    assert not refused.promote and "lacks 2 corruption level(s)" in refused.reasons[0]
    assert "fgsm 5" in refused.reasons[0]
    # different cases: refused; the same cases in another order: compared
    a = report({("noise", 1): 0.1}, ["c1", "c2"])
    assert (
        "different cases"
        in decide_promotion(GOOD_CASES, dict(GOOD_CASES), ROBUST, a, report({("noise", 1): 0.1}, ["c3", "c2"])).reasons[
            0
        ]
    )
    assert decide_promotion(GOOD_CASES, dict(GOOD_CASES), ROBUST, a, report({("noise", 1): 0.1}, ["c2", "c1"])).promote


def test_robustness_gate_needs_the_candidates_report_but_not_the_champions() -> None:
    for champion in (dict(GOOD_CASES), None):
        missing = decide_promotion(GOOD_CASES, champion, ROBUST, None, uniform(0.10))
        assert not missing.promote and "no robustness report" in missing.reasons[0]
    for broken in ({"error": "robustness/robustness.json is not a JSON object"}, {"rows": [{"corruption": "noise"}]}):
        unusable = decide_promotion(GOOD_CASES, dict(GOOD_CASES), ROBUST, broken, uniform(0.10))
        assert not unusable.promote and "robustness report is unusable" in unusable.reasons[0]
    nan = report({("noise", 1): float("nan")})
    assert not decide_promotion(GOOD_CASES, None, ROBUST, nan, None).promote
    uncompared = decide_promotion(GOOD_CASES, dict(GOOD_CASES), ROBUST, uniform(0.30), None)
    assert uncompared.promote and uncompared.statistics["robustness"]["compared"] is False
    assert decide_promotion(GOOD_CASES, None, ROBUST, uniform(0.30), None).promote  # no champion: nothing to compare
    assert (
        json.loads(json.dumps(uncompared.to_dict(), allow_nan=False))["statistics"]["robustness"]["champion_mean_drop"]
        is None
    )
