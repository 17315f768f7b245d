"""The learning-rate schedule over the whole training, as a pure function of the global epoch.

Why a pure function and not a chain of torch schedulers: a federated site trains a few epochs per round in a
fresh process, and the schedule must continue where the previous round left off (round r, local epoch e is
global epoch ``r * E + e`` of a schedule ``R * E`` epochs long). A closed form in the global epoch gives that
by construction, is the same in a resumed process, and can be tested without training anything.
``shared.training.local.train_local`` wraps it in ``torch.optim.lr_scheduler.LambdaLR``.

The shape: a linear warm-up over ``warmup_epochs`` (factor ``(e + 1) / (warmup + 1)``, so it never starts
at 0 and reaches the peak at the first decay epoch), then the decay over the remaining ``T - warmup``
epochs, with ``d`` the epoch inside the decay and ``D`` its length:

- ``constant``: 1;
- ``poly``: ``(1 - d / D) ** power`` (nnU-Net's, power 0.9);
- ``cosine``: one half period from 1 down to ``eta_min / lr0`` (reached after the last epoch);
- ``cosine_warm_restarts``: SGDR (Loshchilov & Hutter 2017) with periods ``t_0, t_0 * t_mult, …``, as
  torch's ``CosineAnnealingWarmRestarts`` stepped once per epoch.

Without warm-up these equal the torch schedulers the loop used before (``PolynomialLR(total_iters=T)``,
``CosineAnnealingWarmRestarts``), up to floating-point rounding.
"""

from __future__ import annotations

import math

from shared.training.config import ScheduleConfig, TrainingConfig


def _floor_ratio(schedule: ScheduleConfig, base_lr: float | None) -> float:
    """``eta_min`` (an absolute learning rate) as a share of the initial one."""
    if schedule.eta_min == 0 or schedule.name in ("constant", "poly"):
        return 0.0
    if base_lr is None or base_lr <= 0:
        raise ValueError("eta_min is an absolute learning rate: pass base_lr (the optimiser's lr) to lr_factor")
    return schedule.eta_min / base_lr


def lr_factor(schedule: ScheduleConfig, epoch: int, total_epochs: int, *, base_lr: float | None = None) -> float:
    """The factor on the optimiser's initial lr for 0-based global ``epoch`` of a ``total_epochs`` training.

    ``base_lr`` (the optimiser's lr) is needed only when a cosine schedule has ``eta_min > 0``. Epochs at or
    past the end train at the last epoch's rate (a site asked for more epochs than the schedule holds keeps
    learning instead of stopping at lr 0). ValueError for a negative epoch, an empty training or a warm-up
    that leaves no epoch to decay over.
    """
    if total_epochs < 1:
        raise ValueError(f"the schedule needs at least one epoch, got total_epochs={total_epochs}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    warmup = schedule.warmup_epochs
    if warmup >= total_epochs:
        raise ValueError(
            f"warmup_epochs={warmup} leaves no epoch of the {total_epochs} to decay over; lower it or train longer"
        )
    epoch = min(epoch, total_epochs - 1)
    if epoch < warmup:
        return (epoch + 1) / (warmup + 1)
    d, length = epoch - warmup, total_epochs - warmup
    if schedule.name == "constant":
        return 1.0
    if schedule.name == "poly":
        return float((1.0 - d / length) ** schedule.power)
    floor = _floor_ratio(schedule, base_lr)
    if schedule.name == "cosine":
        position, period = d, length
    else:  # cosine_warm_restarts
        position, period = d, schedule.t_0
        while position >= period:
            position -= period
            period *= schedule.t_mult
    return floor + (1.0 - floor) * (1.0 + math.cos(math.pi * position / period)) / 2.0


def learning_rate(config: TrainingConfig, epoch: int, total_epochs: int) -> float:
    """The learning rate of 0-based global ``epoch`` under ``config``'s optimiser and schedule."""
    base = config.optimizer.lr
    return base * lr_factor(config.schedule, epoch, total_epochs, base_lr=base)
