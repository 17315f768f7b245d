"""Classification beside segmentation: the task field, the MedMNIST loader and the classification loop on
real AdrenalMNIST3D volumes (downsampled to 16^3 so two CPU cores train them in seconds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from shared.datasets.medmnist import MedMNISTError, load_medmnist3d, stratified_split
from shared.training import TrainingConfig, load_config, train_local
from shared.training.config import CONFIG_DIR, ConfigError
from shared.training.networks import build_network
from shared.training.state import state_from_bytes, state_to_bytes

TINY = {
    "task": "classification",
    "network": {"name": "resnet18", "args": {"widen_factor": 0.125}},
    "loss": {"name": "bce", "pos_weight": 3.0},
    "epochs": 3,
    "batch_size": 8,
    "optimizer": {"lr": 3e-3},
    "schedule": {"name": "cosine"},
}


@pytest.fixture(scope="module")
def adrenal(shared_data: Path) -> dict[str, list[dict[str, Any]]]:
    parts = load_medmnist3d(shared_data / "adrenalmnist3d_64" / "adrenalmnist3d_64_trainval.npz", input_size=(16,) * 3)
    # a small, class-balanced-enough subset: 48 train, 24 val cases of the real set
    train, _ = stratified_split(parts["train"], 1 - 48 / len(parts["train"]), seed=1)
    return {"train": train, "val": parts["val"][:24]}


def test_task_defaults_keep_every_bundled_config_valid() -> None:
    for path in sorted(CONFIG_DIR.glob("hippocampus_*.yaml")):  # written before the field existed
        assert load_config(path).task == "segmentation", path.name
    assert load_config("adrenal_resnet18").task == "classification"
    config = TrainingConfig.from_yaml("task: classification\n")
    assert (config.network.name, config.loss.name, config.num_classes) == ("densenet121", "bce", 2)
    assert TrainingConfig.from_yaml(config.to_yaml()) == config


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        ("task: classification\nnetwork: {name: unet}\n", "needs a network among"),
        ("network: {name: densenet121}\n", "needs a network among"),
        ("task: classification\nloss: {name: dice_ce}\n", "needs a loss among"),
        ("task: classification\nnum_classes: 3\n", "bce is binary"),
        ("loss: {name: dice_ce, pos_weight: 2}\n", "pos_weight applies to bce"),
        ("task: regression\n", "task"),
    ],
)
def test_impossible_task_combinations_are_config_errors(yaml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainingConfig.from_yaml(yaml)


def test_detection_has_no_training_yet(adrenal: dict[str, list[dict[str, Any]]]) -> None:
    config = TrainingConfig.model_validate({"task": "detection"})
    with pytest.raises(ConfigError, match="detection training is not implemented"):
        train_local(config, adrenal["train"], [], None)


def test_classification_networks_emit_their_logits() -> None:
    image = torch.zeros(2, 1, 32, 32, 32)  # DenseNet121's four poolings need 32^3
    for name, loss, classes, outputs in (("resnet18", "bce", 2, 1), ("densenet121", "ce", 3, 3)):
        config = TrainingConfig.model_validate(
            {"task": "classification", "network": {"name": name}, "loss": {"name": loss}, "num_classes": classes}
        )
        assert build_network(config, 1, classes).eval()(image).shape == (2, outputs)


def test_loader_reads_the_real_npz_and_splits_deterministically(shared_data: Path) -> None:
    path = shared_data / "adrenalmnist3d_64" / "adrenalmnist3d_64_trainval.npz"
    native = load_medmnist3d(path, limit=3)
    case = native["train"][0]
    assert case["image"].shape == (1, 64, 64, 64) and case["image"].dtype == torch.float32
    assert float(case["image"].min()) == 0.0 and float(case["image"].max()) == 1.0  # uint8 0..255 scaled
    parts = load_medmnist3d(path, input_size=(8, 8, 8))
    assert (len(parts["train"]), len(parts["val"])) == (1188, 98)
    assert parts["val"][0]["image"].shape == (1, 8, 8, 8)
    assert sum(int(c["label"]) for c in parts["train"]) == 259 and sum(int(c["label"]) for c in parts["val"]) == 22
    kept, test = stratified_split(parts["train"], 0.2, seed=0)
    _, again_test = stratified_split(parts["train"], 0.2, seed=0)
    assert [c["case_id"] for c in test] == [c["case_id"] for c in again_test]
    assert not {c["case_id"] for c in kept} & {c["case_id"] for c in test}
    assert len(kept) + len(test) == 1188
    assert sum(int(c["label"]) for c in test) == round(0.2 * 259)  # stratified: 52 of the 259 positives
    with pytest.raises(MedMNISTError, match="no test_images"):
        load_medmnist3d(path, parts=("test",))


def test_loop_keeps_the_best_validation_auc_chooses_a_threshold_and_is_deterministic(
    adrenal: dict[str, list[dict[str, Any]]],
) -> None:
    config = TrainingConfig.model_validate(TINY)
    first = train_local(config, adrenal["train"], adrenal["val"], None)
    aucs = [float(h.val_auc) for h in first.history if h.val_auc is not None]
    assert len(aucs) == len(first.history) and all(0.0 <= a <= 1.0 for a in aucs)
    assert all(h.val_dice is None for h in first.history)
    assert first.best_epoch == 1 + max(range(len(aucs)), key=lambda i: (aucs[i], -i))
    assert first.metrics["best_val_auc"] == max(aucs)
    assert 0.0 <= first.metrics["threshold"] <= 1.0
    second = train_local(config, adrenal["train"], adrenal["val"], None)
    for key, value in first.state_dict.items():
        assert torch.equal(value, second.state_dict[key]), key


def test_resumed_training_equals_the_uninterrupted_one(adrenal: dict[str, list[dict[str, Any]]]) -> None:
    config = TrainingConfig.model_validate({**TINY, "classification": {"augment": True}})
    saved: list[bytes] = []  # as the worker and the CLI keep them: serialised at once

    def save(checkpoint: dict[str, Any]) -> None:
        saved.append(state_to_bytes(checkpoint))

    whole = train_local(config, adrenal["train"], adrenal["val"], None, epochs=2, save_checkpoint=save)
    # a process that died after epoch 1 restarts from that checkpoint
    resumed = train_local(
        config, adrenal["train"], adrenal["val"], None, epochs=2, load_checkpoint=lambda: state_from_bytes(saved[0])
    )
    assert resumed.resumed_from_epoch == 1
    for key, value in whole.state_dict.items():
        assert torch.allclose(value, resumed.state_dict[key]), key
