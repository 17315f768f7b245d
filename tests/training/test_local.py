"""train_local on real hippocampus cases: learning, divergence, deterministic resume, FedProx."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from shared.training import TrainingConfig, TrainingDiverged, load_config, train_local
from shared.training.local import early_stop_update, fedprox_penalty


def tiny_config(**overrides: Any) -> TrainingConfig:
    data = load_config("hippocampus_unet").model_dump()
    data["early_stopping"] = {"patience": None, "min_delta": 0.0}
    for key, value in overrides.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    return TrainingConfig.model_validate(data)


def test_training_lowers_the_loss_and_reports_each_epoch(hippo_cases: list[dict]) -> None:
    seen: list[Any] = []
    result = train_local(tiny_config(), hippo_cases[:6], hippo_cases[6:], None, epochs=3, progress=seen.append)
    losses = [h.train_loss for h in result.history]
    assert [r.epoch for r in seen] == [1, 2, 3]
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(h.val_dice is not None and 0.0 <= h.val_dice <= 1.0 for h in result.history)
    assert result.num_samples == 6
    assert result.metrics["train_loss"] == losses[-1]
    assert all(h.samples_per_second > 0 for h in result.history)
    assert set(result.state_dict) == set(load_state_keys())


def load_state_keys() -> list[str]:
    from shared.training import build_network

    return list(build_network(tiny_config(), 1, 3).state_dict())


def test_exploding_learning_rate_raises_training_diverged(hippo_cases: list[dict]) -> None:
    config = tiny_config(optimizer={"lr": 1e6}, grad_clip_norm=None)
    with pytest.raises(TrainingDiverged) as info:
        train_local(config, hippo_cases[:4], [], None, epochs=3)
    assert "exploding" in info.value.reason or "not finite" in info.value.reason
    assert info.value.epoch >= 1


def test_nan_in_the_data_raises_training_diverged(hippo_cases: list[dict]) -> None:
    poisoned = [dict(case) for case in hippo_cases[:2]]
    for case in poisoned:
        case["image"] = torch.full_like(case["image"], float("nan"))
    with pytest.raises(TrainingDiverged, match="not finite"):
        train_local(tiny_config(patch={"sampler": "whole"}), poisoned, [], None, epochs=1)


def test_resume_from_checkpoint_equals_uninterrupted_run(hippo_cases: list[dict]) -> None:
    config = tiny_config(schedule={"name": "poly"}, optimizer={"name": "sgd", "lr": 0.01})
    train, val = hippo_cases[:4], hippo_cases[6:7]
    uninterrupted = train_local(config, train, val, None, epochs=3)

    saved: list[dict] = []

    class Killed(Exception):
        pass

    def save_then_die(checkpoint: dict) -> None:
        saved.append(copy.deepcopy(checkpoint))
        if checkpoint["epoch"] == 2:
            raise Killed  # the worker dies right after checkpointing epoch 2

    with pytest.raises(Killed):
        train_local(config, train, val, None, epochs=3, save_checkpoint=save_then_die)
    resumed = train_local(config, train, val, None, epochs=3, load_checkpoint=lambda: saved[-1])

    assert resumed.resumed_from_epoch == 2
    assert [h.epoch for h in resumed.history] == [1, 2, 3]
    for key, value in uninterrupted.state_dict.items():
        assert torch.equal(value, resumed.state_dict[key]), key
    assert resumed.history[-1].train_loss == uninterrupted.history[-1].train_loss


def test_fedprox_keeps_weights_closer_to_the_global_model(hippo_cases: list[dict]) -> None:
    from shared.training import build_network

    config = tiny_config(optimizer={"lr": 0.01})
    torch.manual_seed(123)
    global_state = build_network(config, 1, 3).state_dict()

    def distance(state: dict) -> float:
        return sum(float((state[k].float() - global_state[k].float()).pow(2).sum()) for k in global_state)

    plain = train_local(config, hippo_cases[:4], [], global_state, epochs=2)
    prox = train_local(config, hippo_cases[:4], [], global_state, epochs=2, fedprox_mu=10.0)
    assert distance(prox.state_dict) < 0.8 * distance(plain.state_dict)


def test_fedprox_penalty_is_half_mu_squared_distance() -> None:
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 3.0]]))
    penalty = fedprox_penalty(model, {"weight": torch.tensor([[0.0, 1.0]])}, mu=0.5)
    assert penalty.item() == pytest.approx(0.5 / 2 * (1 + 4))


def test_early_stopping_stops_after_patience(hippo_cases: list[dict]) -> None:
    assert early_stop_update(None, 0, 0.1, 0.0) == (0.1, 0, True)
    assert early_stop_update(0.5, 1, 0.5, 0.01) == (0.5, 2, False)
    # lr 0: nothing changes, val Dice never improves after the first validation
    config = tiny_config(optimizer={"lr": 1e-12}, early_stopping={"patience": 1, "min_delta": 0.01})
    result = train_local(config, hippo_cases[:2], hippo_cases[6:7], None, epochs=5)
    assert result.stopped_early
    assert len(result.history) == 2


def test_bad_inputs_are_refused(hippo_cases: list[dict]) -> None:
    with pytest.raises(ValueError, match="no training cases"):
        train_local(tiny_config(), [], [], None, epochs=1)
    with pytest.raises(ValueError, match="do not fit"):
        train_local(tiny_config(), hippo_cases[:1], [], {"bogus": torch.zeros(1)}, epochs=1)


def test_the_weights_of_the_best_validation_epoch_are_kept(hippo_cases: list[dict]) -> None:
    # a learning rate high enough that validation Dice moves from epoch to epoch
    result = train_local(tiny_config(), hippo_cases[:4], hippo_cases[6:], None, epochs=4)
    dices = [h.val_dice for h in result.history]
    assert result.best_epoch == 1 + max(range(len(dices)), key=lambda i: (dices[i], -i))
    assert result.metrics["best_epoch"] == result.best_epoch
    kept = result.kept_state("best")
    assert result.best_state_dict is not None and kept is result.best_state_dict
    assert result.kept_state("last") is result.state_dict
    if result.best_epoch != len(dices):  # best and last differ: the kept weights must be the best epoch's
        assert any(not torch.equal(kept[k], result.state_dict[k]) for k in kept)


def test_resume_is_bit_identical_with_every_nnunet_augmentation_family_on(hippo_cases: list[dict]) -> None:
    """The nnaug spec's families (noise, blur, contrast, low resolution, inverted gamma, and the elastic
    option) draw only from the seed train_local sets per epoch: a run killed after epoch 1 and resumed
    ends with the uninterrupted run's weights."""
    from shared.preprocessing import PreprocessingSpec, StepSpec, build_transforms, load_spec

    spec = load_spec("mr_hippocampus_nnaug")
    steps = [s.model_copy(update={"args": {**s.args, "prob": 1.0}}) for s in spec.augmentation]
    elastic = StepSpec(
        name="Rand3DElasticd",
        args={"prob": 1.0, "sigma_range": [9, 13], "magnitude_range": [0, 900], "padding_mode": "zeros"},
    )
    forced = PreprocessingSpec.model_validate({**spec.model_dump(), "augmentation": [elastic, *steps]})
    config = tiny_config(batch_size=2)
    train, val = hippo_cases[:2], hippo_cases[6:7]

    def augment() -> Any:
        return build_transforms(forced, "augment")  # each run builds its own, as a restarted worker does

    uninterrupted = train_local(config, train, val, None, epochs=2, augment=augment())
    saved: list[dict] = []

    class Killed(Exception):
        pass

    def save_then_die(checkpoint: dict) -> None:
        saved.append(copy.deepcopy(checkpoint))
        raise Killed

    with pytest.raises(Killed):
        train_local(config, train, val, None, epochs=2, augment=augment(), save_checkpoint=save_then_die)
    resumed = train_local(config, train, val, None, epochs=2, augment=augment(), load_checkpoint=lambda: saved[-1])
    assert resumed.resumed_from_epoch == 1
    for key, value in uninterrupted.state_dict.items():
        assert torch.equal(value, resumed.state_dict[key]), key
    assert resumed.history[-1].train_loss == uninterrupted.history[-1].train_loss
