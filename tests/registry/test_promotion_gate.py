"""The pure promotion gate: threshold, paired Wilcoxon against the champion, and its edge cases."""

from __future__ import annotations

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
    for candidate in (None, {}):
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
