"""Metrics against cases whose answer can be computed by hand, and against real hippocampus labels."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from shared.evaluation import (
    case_metrics,
    format_table,
    mean_dice_per_case,
    summarise,
    write_report,
)
from shared.evaluation.metrics import bootstrap_ci
from shared.inference import SlidingWindowPredictor, TorchModuleBackend, predict_labels

LABELS = {0: "background", 1: "a", 2: "b"}


def cube_pair(shift: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Truth: a 5^3 cube of label 1; prediction: the same cube shifted ``shift`` voxels along the last axis."""
    truth = np.zeros((20, 20, 20), dtype=np.uint8)
    prediction = np.zeros_like(truth)
    truth[5:10, 5:10, 5:10] = 1
    prediction[5:10, 5:10, 5 + shift : 10 + shift] = 1
    return prediction, truth


def by_label(records: list[dict]) -> dict[str, dict]:
    return {r["label_name"]: r for r in records}


def test_shifted_cube_matches_hand_computed_overlap() -> None:
    prediction, truth = cube_pair(shift=1)
    record = by_label(case_metrics(prediction, truth, {1: "a"}, spacing=(1.0, 1.0, 2.0)))["a"]
    # overlap 5*5*4 = 100 voxels of 125 each; union 150; 8000 voxels in all
    assert record["dice"] == pytest.approx(2 * 100 / 250)
    assert record["iou"] == pytest.approx(100 / 150)
    assert record["sensitivity"] == pytest.approx(100 / 125)
    assert record["ppv"] == pytest.approx(100 / 125)
    assert record["specificity"] == pytest.approx((8000 - 150) / (8000 - 125))
    assert record["npv"] == pytest.approx((8000 - 150) / (8000 - 125))
    # every surface point is at most one voxel (2 mm along the shifted axis) from the other surface
    assert record["hd95"] == pytest.approx(2.0)
    assert 0 < record["asd"] < 2.0
    assert (record["truth_voxels"], record["predicted_voxels"]) == (125, 125)


def test_distances_scale_with_spacing_and_identity_is_perfect() -> None:
    prediction, truth = cube_pair(shift=2)
    unit = by_label(case_metrics(prediction, truth, {1: "a"}, spacing=(1, 1, 1)))["a"]
    stretched = by_label(case_metrics(prediction, truth, {1: "a"}, spacing=(1, 1, 3)))["a"]
    assert stretched["hd95"] == pytest.approx(3 * unit["hd95"])
    assert stretched["asd"] > unit["asd"]
    perfect = by_label(case_metrics(truth, truth, {1: "a"}))["a"]
    assert perfect["dice"] == perfect["iou"] == perfect["sensitivity"] == perfect["ppv"] == 1.0
    assert perfect["hd95"] == perfect["asd"] == 0.0


def test_empty_structures_follow_the_documented_convention() -> None:
    _, truth = cube_pair()
    records = by_label(case_metrics(np.zeros_like(truth), truth, LABELS))
    missed, absent = records["a"], records["b"]
    assert missed["dice"] == 0.0 and missed["sensitivity"] == 0.0
    assert math.isnan(missed["hd95"]) and math.isnan(missed["asd"]) and math.isnan(missed["ppv"])
    # label 2 is in neither: nothing to find, nothing found
    assert absent["dice"] == absent["iou"] == 1.0 and absent["hd95"] == absent["asd"] == 0.0
    assert math.isnan(absent["sensitivity"]) and math.isnan(absent["ppv"]) and absent["specificity"] == 1.0
    hallucinated = by_label(case_metrics(truth, np.zeros_like(truth), {1: "a"}))["a"]
    assert hallucinated["dice"] == 0.0 and math.isnan(hallucinated["hd95"])


def test_bad_input_is_refused_clearly() -> None:
    prediction, truth = cube_pair()
    with pytest.raises(ValueError, match="shape"):
        case_metrics(prediction[:-1], truth, LABELS)
    with pytest.raises(ValueError, match="non-integer"):
        case_metrics(prediction * 0.5, truth, LABELS)
    with pytest.raises(ValueError, match="foreground"):
        case_metrics(prediction, truth, {0: "background"})
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(prediction, truth, LABELS, spacing=(1, 1))


def test_real_hippocampus_label_against_itself_shifted(hippocampus_dir: Path) -> None:
    image = nib.load(hippocampus_dir / "labelsTr" / "hippocampus_004.nii.gz")
    truth = np.asarray(image.dataobj).astype(np.int64)
    spacing = tuple(float(s) for s in image.header.get_zooms()[:3])
    names = {1: "anterior", 2: "posterior"}
    same = by_label(case_metrics(torch.as_tensor(truth)[None], truth, names, spacing=spacing))
    assert all(same[n]["dice"] == 1.0 and same[n]["hd95"] == 0.0 for n in names.values())
    shifted = np.roll(truth, 1, axis=0)
    records = by_label(case_metrics(shifted, truth, names, spacing=spacing))
    for name, label in (("anterior", 1), ("posterior", 2)):
        # Dice from the voxel counts, computed independently of MONAI
        overlap = np.logical_and(shifted == label, truth == label).sum()
        expected = 2 * overlap / ((shifted == label).sum() + (truth == label).sum())
        assert records[name]["dice"] == pytest.approx(expected, rel=1e-5)
        assert 0.3 < records[name]["dice"] < 1.0
        assert records[name]["hd95"] == pytest.approx(1.0)  # 1 mm spacing, one-voxel shift
        assert records[name]["truth_voxels"] == int((truth == label).sum())


def test_summary_mean_and_bootstrap_interval() -> None:
    rng = np.random.default_rng(3)
    values = rng.uniform(0.6, 0.9, size=40)
    records = [{"case_id": str(i), "label_name": "a", "dice": v} for i, v in enumerate(values)]
    records.append({"case_id": "nan-case", "label_name": "a", "dice": math.nan})
    stats = summarise(records, n_boot=500, seed=1, metrics=("dice",))["a"]["dice"]
    assert stats["mean"] == pytest.approx(values.mean())
    assert stats["n"] == 40 and stats["n_undefined"] == 1
    assert stats["ci_low"] < stats["mean"] < stats["ci_high"]
    half_width = 1.96 * values.std(ddof=1) / math.sqrt(40)  # normal approximation of the same interval
    assert stats["ci_high"] - stats["ci_low"] == pytest.approx(2 * half_width, rel=0.25)
    assert summarise(records, n_boot=500, seed=1, metrics=("dice",)) == summarise(
        records, n_boot=500, seed=1, metrics=("dice",)
    )
    assert all(math.isnan(v) for v in bootstrap_ci([0.5]))
    assert bootstrap_ci([0.7, 0.7, 0.7]) == (0.7, 0.7)


def test_mean_dice_per_case_averages_labels() -> None:
    records = [
        {"case_id": "x", "dice": 0.8},
        {"case_id": "x", "dice": 0.6},
        {"case_id": "y", "dice": 1.0},
    ]
    assert mean_dice_per_case(records) == {"x": pytest.approx(0.7), "y": 1.0}


def test_predict_labels_gives_argmax_label_map() -> None:
    class Constant(torch.nn.Module):
        """Logits favouring class 2 wherever the input is positive, else class 0."""

        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            positive = (x > 0).float() * self.scale
            return torch.cat([1 - positive, torch.zeros_like(x), 2 * positive], dim=1)

    image = -torch.ones(1, 13, 17, 11)
    image[:, 2:6, 3:9, 4:7] = 1.0
    predictor = SlidingWindowPredictor(TorchModuleBackend(Constant()), roi_size=(8, 8, 8), sw_batch_size=1)
    labels = predict_labels(predictor, image)
    assert labels.shape == (1, 13, 17, 11) and labels.dtype == torch.int64
    assert torch.equal(labels[0] == 2, image[0] > 0) and set(labels.unique().tolist()) == {0, 2}
    with pytest.raises(ValueError, match="channel-first"):
        predict_labels(predictor, image[0])


def test_report_files_and_table(tmp_path: Path) -> None:
    prediction, truth = cube_pair()
    records = [{"case_id": "c1", **r} for r in case_metrics(prediction, truth, LABELS)]
    records += [{"case_id": "c2", **r} for r in case_metrics(truth, truth, LABELS)]
    summary = summarise(records, n_boot=100)
    table = format_table(summary)
    assert table.splitlines()[0].split()[:3] == ["label", "dice", "iou"]
    assert any(line.startswith("a ") for line in table.splitlines())
    written = write_report(tmp_path / "r.csv", {"cases": records, "summary": summary})
    assert [p.name for p in written] == ["r.csv", "r.json"]
    rows = (tmp_path / "r.csv").read_text().splitlines()
    assert len(rows) == 1 + len(records) and rows[0].startswith("case_id,label,")
    loaded = json.loads((tmp_path / "r.json").read_text())
    assert loaded["summary"]["b"]["ppv"]["mean"] is None  # NaN is written as null, not as invalid JSON
    with pytest.raises(ValueError, match=r"\.json or \.csv"):
        write_report(tmp_path / "r.txt", {"cases": records, "summary": summary})
