"""Robustness evaluation: the perturbations themselves, and ``voxelflow evaluate --robustness`` end to end on
real hippocampus cases with a model trained here for a few steps and registered in the real MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from shared.cli import main
from shared.evaluation.robustness import CORRUPTIONS, adversarial, catalogue, robustness_summary
from shared.preprocessing import build_transforms, load_spec
from shared.registry import log_training_run, register_model_version, registry_client
from tests.evaluation.test_evaluate_cli import CASES, msd_folder  # noqa: F401  (fixture)
from tests.registry.conftest import LABELS, TINY_CONFIG, tiny_network_builder, unique_name


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
    msd_folder: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    torch.set_num_threads(1)
    client = registry_client(mlflow_uri)
    monkeypatch.setenv("VOXELFLOW_MLFLOW_TRACKING_URI", mlflow_uri)
    spec = load_spec("mr_hippocampus")
    preprocess = build_transforms(spec, "preprocess")
    batches = [
        preprocess(
            {
                "image": str(msd_folder / "imagesTr" / f"{c}.nii.gz"),
                "label": str(msd_folder / "labelsTr" / f"{c}.nii.gz"),
            }
        )
        for c in CASES
    ]
    config_yaml = yaml.safe_dump({**TINY_CONFIG, "validation": {"roi_size": [32, 48, 32]}})
    torch.manual_seed(0)
    network = tiny_network_builder(config_yaml, 1, 3)
    optimiser = torch.optim.Adam(network.parameters(), lr=1e-2)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    for _ in range(4):
        for batch in batches:
            optimiser.zero_grad()
            loss_fn(network(batch["image"][None].float()), batch["label"][None].float()).backward()
            optimiser.step()
    run_id = log_training_run(
        experiment="evaluate-robustness",
        state_dict=network.state_dict(),
        training_config_yaml=config_yaml,
        preprocessing_spec=spec.to_dict(),
        preprocessing_hash=spec.hash,
        labels=LABELS,
        dataset_version="ds-test",
        client=client,
    )
    name = unique_name("robust")
    register_model_version(run_id, name, client=client)
    out = tmp_path / "rob"
    capsys.readouterr()
    main(
        [
            "evaluate",
            "--model",
            f"models:/{name}/1",
            "--data",
            str(msd_folder),
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
        main(
            [
                "evaluate",
                "--model",
                f"models:/{name}/1",
                "--data",
                str(msd_folder),
                "--robustness",
                "--corruptions",
                "blur",
            ]
        )
