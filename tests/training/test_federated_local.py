"""train_local as one round of a longer training: the schedule and the optimiser state continue across calls.

The strongest check there is: a training cut into rounds (each call a fresh optimiser and scheduler, as in a
fresh site process) that carries its weights and optimiser state from call to call is bit-identical to the
uninterrupted training; with fresh optimiser state it is not.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from shared.training import TrainingConfig, train_local

TINY_NET = {"name": "unet", "args": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0}}


def config(**overrides: Any) -> TrainingConfig:
    return TrainingConfig.model_validate(
        {
            "network": TINY_NET,
            "optimizer": {"name": "adamw", "lr": 0.004},
            "schedule": {"name": "poly", "warmup_epochs": 1},
            "patch": {"sampler": "pos_neg", "size": [32, 32, 32], "num_samples": 1},
            "seed": 5,
            **overrides,
        }
    )


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_rounds_carrying_weights_and_optimiser_state_equal_one_uninterrupted_training(
    hippo_cases: list[dict],
) -> None:
    cfg, train = config(), hippo_cases[:2]
    whole = train_local(cfg, train, [], None, epochs=3)

    state, optimizer_state, lrs = None, None, []
    for r in range(3):
        part = train_local(
            cfg, train, [], state, epochs=1, schedule_offset=r, schedule_total=3, optimizer_state=optimizer_state
        )
        state, optimizer_state = part.state_dict, part.optimizer_state
        lrs += [h.lr for h in part.history]
    assert state is not None and optimizer_state is not None
    assert_same_weights(state, whole.state_dict)
    assert lrs == [h.lr for h in whole.history]
    assert lrs[0] < lrs[1] > lrs[2]  # warm-up in the first round only, then the decay
    steps = {float(s["step"]) for s in optimizer_state["state"].values()}
    assert steps == {float(sum(h.samples for h in whole.history) // cfg.batch_size)}  # Adam's t ran on


def test_the_second_round_starts_from_the_carried_moments_not_fresh_ones(hippo_cases: list[dict]) -> None:
    cfg, train = config(), hippo_cases[:2]
    first = train_local(cfg, train, [], None, epochs=1, schedule_total=2)
    carried = train_local(
        cfg, train, [], first.state_dict, epochs=1, schedule_offset=1, schedule_total=2,
        optimizer_state=first.optimizer_state,
    )  # fmt: skip
    fresh = train_local(cfg, train, [], first.state_dict, epochs=1, schedule_offset=1, schedule_total=2)
    assert carried.history[0].lr == fresh.history[0].lr  # same schedule: only the optimiser state differs
    differs = [k for k in carried.state_dict if not torch.equal(carried.state_dict[k], fresh.state_dict[k])]
    assert differs, "carrying the Adam moments changed nothing: the state was not used"
    with pytest.raises(ValueError, match="does not fit"):
        other = config(network={"name": "unet", "args": {"channels": [4, 8], "strides": [2], "num_res_units": 0}})
        train_local(other, train, [], None, epochs=1, optimizer_state=first.optimizer_state)


def test_resume_inside_a_later_round_stays_bit_identical(hippo_cases: list[dict]) -> None:
    cfg, train, val = config(), hippo_cases[:2], hippo_cases[6:7]
    first = train_local(cfg, train, [], None, epochs=1, schedule_total=3)
    kwargs: dict[str, Any] = {
        "epochs": 2,
        "schedule_offset": 1,
        "schedule_total": 3,
        "optimizer_state": first.optimizer_state,
    }
    uninterrupted = train_local(cfg, train, val, first.state_dict, **kwargs)

    saved: list[dict] = []

    class Killed(Exception):
        pass

    def save_then_die(checkpoint: dict) -> None:
        saved.append(copy.deepcopy(checkpoint))
        raise Killed  # the site dies right after checkpointing its first epoch of the round

    with pytest.raises(Killed):
        train_local(cfg, train, val, first.state_dict, save_checkpoint=save_then_die, **kwargs)
    resumed = train_local(cfg, train, val, first.state_dict, load_checkpoint=lambda: saved[-1], **kwargs)
    assert resumed.resumed_from_epoch == 1
    assert_same_weights(resumed.state_dict, uninterrupted.state_dict)
    assert [h.lr for h in resumed.history] == [h.lr for h in uninterrupted.history]
    assert resumed.history[-1].train_loss == uninterrupted.history[-1].train_loss
