"""The pure pieces of global-model evaluation: round metrics from per-case records, test metrics, spacing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.aggregation.evaluation import summarise_sites
from shared.evaluation import case_metrics
from shared.evaluation.held_out import evaluate_network, held_out_metrics, spacing_of

LABELS = {0: "bg", 1: "a", 2: "b"}


def records(case_id: str, dice_a: float, dice_b: float) -> list[dict]:
    return [
        {"case_id": case_id, "label_name": "a", "dice": dice_a},
        {"case_id": case_id, "label_name": "b", "dice": dice_b},
    ]


def test_summarise_sites_pools_cases_and_skips_sites_without_val():
    summary = summarise_sites(
        {"x": records("c1", 1.0, 0.5) + records("c2", 0.0, 0.5), "y": records("c3", 1.0, 1.0), "z": []}
    )
    assert summary["val_dice"] == {"x": pytest.approx(0.5), "y": pytest.approx(1.0)}
    assert summary["sites"]["x"] == {"val_dice": 0.5, "val_cases": 2.0, "val_dice_a": 0.5, "val_dice_b": 0.5}
    # pooled over the 3 cases (0.75, 0.25, 1.0), not the mean of the two site means (0.75)
    assert summary["val_dice_mean"] == pytest.approx(2.0 / 3.0)
    assert summary["mean"] == {"val_dice": pytest.approx(2.0 / 3.0), "val_cases": 3.0}
    assert summarise_sites({"x": []}) == {}


def test_test_metrics_have_means_and_bootstrap_intervals():
    values = held_out_metrics(records("c1", 0.9, 0.5) + records("c2", 0.7, 0.3) + records("c3", 0.8, 0.4), n_boot=200)
    assert values["test/dice_mean"] == pytest.approx(0.6)
    assert values["test/cases"] == 3.0
    assert values["test/a/dice"] == pytest.approx(0.8)
    assert values["test/a/dice_ci_low"] <= 0.8 <= values["test/a/dice_ci_high"]
    assert values["test/a/dice_ci_low"] < values["test/a/dice_ci_high"]
    single = held_out_metrics(records("c1", 0.9, 0.5))
    assert "test/a/dice_ci_low" not in single  # undefined with one case: left out, not NaN
    assert held_out_metrics([]) == {}


def test_evaluate_network_scores_what_the_network_predicts():
    """A 'network' that outputs the one-hot truth as logits scores Dice 1; spacing comes from the affine."""
    label = torch.zeros((1, 16, 16, 16), dtype=torch.uint8)
    label[0, 2:6, 2:6, 2:6] = 1
    label[0, 9:13, 9:13, 9:13] = 2
    onehot = torch.nn.functional.one_hot(label[0].long(), 3).permute(3, 0, 1, 2).float()

    class Oracle(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x * 0 + 1) * onehot.unsqueeze(0) * self.scale

    affine = torch.diag(torch.tensor([2.0, 1.0, 1.5, 1.0], dtype=torch.float64))
    assert spacing_of(affine) == [2.0, 1.0, 1.5]
    case = {"case_id": "c1", "image": torch.randn(1, 16, 16, 16), "label": label, "affine": affine}
    out = evaluate_network(Oracle(), [case], LABELS, roi_size=(16, 16, 16))
    assert [r["dice"] for r in out] == [1.0, 1.0] and {r["case_id"] for r in out} == {"c1"}
    wrong = {**case, "label": torch.zeros_like(label)}
    assert [r["dice"] for r in evaluate_network(Oracle(), [wrong], LABELS, (16, 16, 16))] == [0.0, 0.0]
    expected = case_metrics(label, label, LABELS, [2.0, 1.0, 1.5])
    assert [r["hd95"] for r in out] == [r["hd95"] for r in expected]
    with pytest.raises(ValueError, match="no label"):
        evaluate_network(Oracle(), [{**case, "label": None}], LABELS, (16, 16, 16))
    assert np.isfinite([r["dice"] for r in out]).all()
