"""``voxelflow evaluate`` end to end: a model trained here for a few steps on real hippocampus cases,
registered in the real MLflow, evaluated through the CLI with the model's own stored preprocessing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from monai.losses import DiceCELoss

from shared.cli import main
from shared.preprocessing import build_transforms, load_spec
from shared.registry import log_training_run, register_model_version, registry_client
from tests.registry.conftest import LABELS, TINY_CONFIG, tiny_network_builder, unique_name

CASES = ("hippocampus_004", "hippocampus_006", "hippocampus_007")


@pytest.fixture
def msd_folder(hippocampus_dir: Path, tmp_path: Path) -> Path:
    """A three-case MSD folder (small copies: the reader refuses files outside the folder)."""
    folder = tmp_path / "msd"
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
        for case in CASES:
            shutil.copy(hippocampus_dir / sub / f"{case}.nii.gz", folder / sub)
    index = json.loads((hippocampus_dir / "dataset.json").read_text())
    index["training"] = [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in CASES]
    (folder / "dataset.json").write_text(json.dumps(index))
    return folder


def test_evaluate_cli_on_hippocampus(
    mlflow_uri: str, msd_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    torch.set_num_threads(1)
    mlflow_client = registry_client(mlflow_uri)
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
    config = {**TINY_CONFIG, "validation": {"roi_size": [32, 48, 32]}}
    config_yaml = yaml.safe_dump(config)
    torch.manual_seed(0)
    network = tiny_network_builder(config_yaml, 1, 3)
    optimiser = torch.optim.Adam(network.parameters(), lr=1e-2)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    losses = []
    for _ in range(4):  # a few steps: enough to move the weights, not to learn the anatomy
        for batch in batches:
            optimiser.zero_grad()
            loss = loss_fn(network(batch["image"][None].float()), batch["label"][None].float())
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
    run_id = log_training_run(
        experiment="evaluate-cli",
        state_dict=network.state_dict(),
        training_config_yaml=config_yaml,
        preprocessing_spec=spec.to_dict(),
        preprocessing_hash=spec.hash,
        labels=LABELS,
        dataset_version="ds-test",
        client=mlflow_client,
    )
    name = unique_name("evaluate")
    register_model_version(run_id, name, client=mlflow_client)

    out = tmp_path / "report.csv"
    capsys.readouterr()  # MLflow prints a run link while logging; the CLI's table is what follows
    main(
        [
            "evaluate",
            "--model",
            f"models:/{name}@candidate",
            "--data",
            str(msd_folder),
            "--out",
            str(out),
            "--bootstrap",
            "200",
        ]
    )
    table = capsys.readouterr().out
    assert table.splitlines()[0].startswith("label") and "anterior" in table and "posterior" in table
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["model"]["uri"] == f"models:/{name}/1" and report["data"]["cases"] == 3
    assert {(r["case_id"], r["label_name"]) for r in report["cases"]} == {
        (c, n) for c in CASES for n in ("anterior", "posterior")
    }
    # metrics are computed on the original grid: truth voxel counts equal the raw label files' counts
    import nibabel as nib
    import numpy as np

    raw = np.asarray(nib.load(msd_folder / "labelsTr" / "hippocampus_006.nii.gz").dataobj)
    row = next(r for r in report["cases"] if r["case_id"] == "hippocampus_006" and r["label"] == 1)
    assert row["truth_voxels"] == int((raw == 1).sum())
    assert all(0.0 <= r["dice"] <= 1.0 for r in report["cases"])
    dice = report["summary"]["anterior"]["dice"]
    assert dice["n"] == 3 and dice["ci_low"] <= dice["mean"] <= dice["ci_high"]
    assert len(out.read_text().splitlines()) == 1 + 6

    with pytest.raises(SystemExit, match="not a registry URI"):
        main(["evaluate", "--model", "hippo-latest", "--data", str(msd_folder)])
    with pytest.raises(SystemExit, match=r"no dataset\.json"):
        main(["evaluate", "--model", f"models:/{name}/1", "--data", str(tmp_path)])
