"""Fixtures for evaluation tests: the real MSD hippocampus set (read in place, or three cases copied into a
small MSD folder), and a tiny model trained here on them and registered in the real MLflow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from monai.losses import DiceCELoss

from shared.preprocessing import build_transforms, load_spec
from shared.registry import log_training_run, register_model_version
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


def register_tiny_model(msd_folder: Path, client: MlflowClient, experiment: str, name_prefix: str) -> tuple[str, str]:
    """Train the tiny network a few steps on the folder's cases (enough to move the weights, not to learn the
    anatomy), log it with the hippocampus preprocessing and register it: returns (run id, model name)."""
    torch.set_num_threads(1)
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
        experiment=experiment,
        state_dict=network.state_dict(),
        training_config_yaml=config_yaml,
        preprocessing_spec=spec.to_dict(),
        preprocessing_hash=spec.hash,
        labels=LABELS,
        dataset_version="ds-test",
        client=client,
    )
    name = unique_name(name_prefix)
    register_model_version(run_id, name, client=client)
    return run_id, name
