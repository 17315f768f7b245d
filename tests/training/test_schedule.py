"""The learning-rate schedule over the whole training (shared.training.schedule), as pure functions and as
the LambdaLR train_local steps through, checked against torch's own schedulers where they exist."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from shared.training.config import ScheduleConfig, TrainingConfig
from shared.training.local import _scheduler
from shared.training.schedule import learning_rate, lr_factor


def torch_lrs(make: object, epochs: int, lr: float = 0.01) -> list[float]:
    """The lr of each epoch under a torch scheduler stepped once per epoch (the independent reference)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = make(optimizer)  # type: ignore[operator]
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def factors(schedule: ScheduleConfig, total: int, base_lr: float = 0.01) -> list[float]:
    return [lr_factor(schedule, e, total, base_lr=base_lr) for e in range(total)]


def test_warm_up_is_linear_and_reaches_the_peak_at_the_first_decay_epoch() -> None:
    schedule = ScheduleConfig(name="poly", warmup_epochs=4)
    got = factors(schedule, 20)
    assert got[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(a < b for a, b in itertools.pairwise(got[:5]))
    # after the warm-up: poly over the remaining 16 epochs, as if those were the whole training
    assert got[4:] == pytest.approx(factors(ScheduleConfig(name="poly"), 16))


def test_without_warm_up_the_decays_equal_the_torch_schedulers() -> None:
    total = 23
    poly = torch_lrs(lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=total, power=0.9), total)
    assert [0.01 * f for f in factors(ScheduleConfig(name="poly", power=0.9), total)] == pytest.approx(poly)
    sgdr = torch_lrs(
        lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=4, T_mult=2, eta_min=1e-4), total
    )
    schedule = ScheduleConfig(name="cosine_warm_restarts", t_0=4, t_mult=2, eta_min=1e-4)
    assert [0.01 * f for f in factors(schedule, total)] == pytest.approx(sgdr)
    cosine = torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=total, eta_min=1e-4), total)
    assert [0.01 * f for f in factors(ScheduleConfig(name="cosine", eta_min=1e-4), total)] == pytest.approx(cosine)
    assert factors(ScheduleConfig(), total) == [1.0] * total


def test_cosine_falls_monotonically_from_the_peak_towards_eta_min() -> None:
    got = factors(ScheduleConfig(name="cosine", warmup_epochs=2, eta_min=1e-3), 12, base_lr=0.01)
    decay = got[2:]
    assert decay[0] == 1.0
    assert all(a > b for a, b in itertools.pairwise(decay))
    # one step before the floor: the half period ends after the last epoch
    assert decay[-1] == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 9 / 10)) / 2)


def test_epochs_past_the_end_keep_the_last_rate_and_bad_schedules_are_refused() -> None:
    schedule = ScheduleConfig(name="poly")
    assert lr_factor(schedule, 10, 10) == lr_factor(schedule, 9, 10) > 0
    with pytest.raises(ValueError, match="no epoch of the 3"):
        lr_factor(ScheduleConfig(warmup_epochs=3), 0, 3)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        lr_factor(schedule, -1, 3)
    with pytest.raises(ValueError, match="pass base_lr"):
        lr_factor(ScheduleConfig(name="cosine", eta_min=1e-5), 0, 3)


@pytest.mark.parametrize("name", ["poly", "cosine", "cosine_warm_restarts", "constant"])
def test_round_slices_of_the_scheduler_continue_the_centralised_schedule(name: str) -> None:
    """lr at round r, local epoch e == the centralised schedule at global epoch r*E+e, through the LambdaLR
    train_local builds (each round a fresh optimiser and scheduler, as in a fresh site process)."""
    rounds, local_epochs = 4, 3
    config = TrainingConfig.model_validate(
        {"schedule": {"name": name, "warmup_epochs": 2, "t_0": 4, "eta_min": 1e-5}, "optimizer": {"lr": 0.004}}
    )
    total = rounds * local_epochs
    centralised = [learning_rate(config, e, total) for e in range(total)]
    sliced = []
    for r in range(rounds):
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.AdamW([param], lr=config.optimizer.lr)
        scheduler = _scheduler(config, optimizer, r * local_epochs, total)
        for _ in range(local_epochs):
            sliced.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
    assert sliced == pytest.approx(centralised, rel=1e-12)
    assert centralised[0] < centralised[2]  # the warm-up happens once, in round 0, not in every round
