"""Robustness evaluation: the perturbations themselves, and ``voxelflow evaluate --robustness`` end to end on
real hippocampus cases with a model trained here for a few steps and registered in the real MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from shared.cli import main
from shared.evaluation.robustness import CORRUPTIONS, adversarial, catalogue, robustness_summary
from shared.registry import registry_client
from tests.evaluation.conftest import register_tiny_model


def _image() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn((1, 16, 24, 16), generator=generator)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruptions_are_deterministic_and_graded(name: str) -> None:
    image = _image()
    perturb = CORRUPTIONS[name][0]
    weak, strong = perturb(image, 1, 7), perturb(image, 5, 7)
    assert weak.shape == strong.shape == image.shape
    assert torch.equal(weak, perturb(image, 1, 7))  # same seed, same corruption
    assert float((strong - image).abs().mean()) > float((weak - image).abs().mean()) > 0
    with pytest.raises(ValueError, match="level"):
        perturb(image, 6, 7)


def test_kspace_artefacts_keep_the_mean_and_act_along_one_axis() -> None:
    image = _image()
    for perturb in (CORRUPTIONS["ghosting"][0], CORRUPTIONS["motion"][0]):
        corrupted = perturb(image, 3, 11)
        # the k-space centre (DC) is untouched: the mean intensity stays, the artefact is structure
        assert float(corrupted.mean()) == pytest.approx(float(image.mean()), abs=1e-5)
        assert not torch.allclose(corrupted, image, atol=1e-3)
    # ghosting of a constant volume is nothing (all its energy is at the centre of k-space)
    flat = torch.full((1, 8, 8, 8), 3.0)
    assert torch.allclose(CORRUPTIONS["ghosting"][0](flat, 5, 0), flat, atol=1e-5)


def test_attacks_stay_in_the_ball_and_raise_the_loss() -> None:
    torch.manual_seed(0)
    network = UNet(3, 1, 3, (4, 8), (2,), num_res_units=0).eval()
    image = _image()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    def logits(x: torch.Tensor) -> torch.Tensor:
        out = sliding_window_inference(x[None], (16, 16, 16), 1, network)
        assert isinstance(out, torch.Tensor)
        return out

    with torch.no_grad():
        target = logits(image).argmax(1, keepdim=True)
        clean_loss = float(loss_fn(logits(image), target))
    for steps in (1, 5):
        adv = adversarial(network, image, 0.1, (16, 16, 16), steps=steps)
        assert float((adv - image).abs().max()) <= 0.1 + 1e-6
        with torch.no_grad():
            adv_loss = float(loss_fn(logits(adv), target))
        assert adv_loss > clean_loss
    assert set(catalogue(network, (16, 16, 16))) == set(CORRUPTIONS) | {"fgsm", "pgd"}
    assert "fgsm" not in catalogue(None, (16, 16, 16))


def test_summary_drop() -> None:
    summary = robustness_summary({"dice": 0.8}, {("noise", 1): 0.7, ("noise", 5): 0.4})
    assert [round(r["drop"], 6) for r in summary["rows"]] == [0.1, 0.4]
    assert summary["mean_drop"] == pytest.approx(0.25)


def test_evaluate_robustness_cli(
    mlflow_uri: str,
    msd_folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("VOXELFLOW_MLFLOW_TRACKING_URI", mlflow_uri)
    client = registry_client(mlflow_uri)
    run_id, name = register_tiny_model(msd_folder, client, "evaluate-robustness", "robust")
    out = tmp_path / "rob"
    capsys.readouterr()
    evaluate = ["evaluate", "--model", f"models:/{name}/1", "--data", str(msd_folder)]
    main(
        [
            *evaluate,
            "--bootstrap",
            "10",
            "--robustness",
            "--robustness-cases",
            "1",
            "--robustness-levels",
            "1",
            "5",
            "--corruptions",
            "noise",
            "fgsm",
            "--robustness-out",
            str(out),
        ]
    )
    table = capsys.readouterr().out
    assert "corruption" in table and "fgsm" in table and "mean drop" in table
    report = json.loads((out / "robustness.json").read_text())
    assert {(r["corruption"], r["level"]) for r in report["rows"]} == {
        ("noise", 1),
        ("noise", 5),
        ("fgsm", 1),
        ("fgsm", 5),
    }
    assert report["cases"] == 1 and 0.0 <= report["clean_dice"] <= 1.0
    assert len(report["case_ids"]) == 1  # what the promotion gate checks two reports share
    assert (out / "robustness.png").read_bytes()[:4] == b"\x89PNG"
    metrics = client.get_run(run_id).data.metrics
    assert metrics["robustness_mean_drop"] == pytest.approx(report["mean_drop"])
    assert metrics["robustness/fgsm/5/dice"] == pytest.approx(
        next(r["dice"] for r in report["rows"] if r["corruption"] == "fgsm" and r["level"] == 5)
    )
    assert {"robustness/robustness.json", "robustness/robustness.png"} <= {
        a.path for a in client.list_artifacts(run_id, "robustness")
    }
    with pytest.raises(SystemExit, match="unknown corruptions"):
        main([*evaluate, "--robustness", "--corruptions", "blur"])
