"""Local training: the one loop behind a federated site's round and the centralised baseline.

``train_local`` is deliberately a function of (config, data, starting weights) plus callbacks, so the
training-worker (object storage, Celery progress) and the centralised CLI (local files, torchrun) share
every line that decides what the weights become. Determinism: everything random in epoch ``e`` (sample
order, augmentation, patch positions) is seeded from ``(config.seed, e, rank)`` at the start of the epoch,
so a run resumed from the checkpoint of epoch ``e - 1`` continues exactly as the uninterrupted one would.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, cast

import torch
import torch.distributed as dist
from monai.data import DataLoader, Dataset
from monai.data.utils import list_data_collate, pad_list_data_collate
from monai.inferers import sliding_window_inference
from monai.losses import DeepSupervisionLoss, DiceCELoss
from monai.metrics import DiceMetric
from monai.transforms import (
    AsDiscrete,
    Compose,
    DivisiblePadd,
    RandCropByPosNegLabeld,
    RandSpatialCropd,
    SpatialPadd,
)
from torch.utils.data.distributed import DistributedSampler

from shared.training.config import ConfigError, TrainingConfig
from shared.training.networks import build_network
from shared.training.schedule import lr_factor

log = logging.getLogger("voxelflow.training")

Case = Mapping[str, Any]  # {"image": (C, X, Y, Z) float tensor, "label": (1, X, Y, Z) int tensor, ...}


class CaseSource(Protocol):
    """What training reads cases from: a list, or a dataset such as shared.datasets.CachedCaseDataset."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Case: ...


StateDict = dict[str, torch.Tensor]


class TrainingDiverged(RuntimeError):
    """The loss or the gradients left the finite, bounded range: retrying the same job cannot help."""

    def __init__(self, reason: str, *, epoch: int, step: int):
        super().__init__(f"training diverged at epoch {epoch}, step {step}: {reason}")
        self.reason = reason
        self.epoch = epoch
        self.step = step


@dataclass(frozen=True)
class EpochRecord:
    epoch: int  # 1-based, completed
    train_loss: float
    val_dice: float | None
    lr: float
    seconds: float
    samples_per_second: float
    val_dice_per_class: list[float] | None = None
    samples: int = 0  # samples (patches) seen in the epoch, summed over all ranks
    val_auc: float | None = None  # classification (shared.training.classification): validation ROC AUC


@dataclass
class LocalResult:
    state_dict: StateDict
    num_samples: int
    metrics: dict[str, float]
    history: list[EpochRecord] = field(default_factory=list)
    stopped_early: bool = False
    resumed_from_epoch: int = 0
    #: weights of the epoch with the best validation Dice (None without validation) and that epoch
    best_state_dict: StateDict | None = None
    best_epoch: int | None = None

    def kept_state(self, keep: str) -> StateDict:
        """The weights ``TrainingConfig.keep`` asks for: the best validated ones (when there are), or the last."""
        return self.best_state_dict if keep == "best" and self.best_state_dict is not None else self.state_dict

    optimizer_state: dict[str, Any] | None = None  # on the CPU; a federated site carries it to its next round


# --- pure pieces ---------------------------------------------------------------------------------------


def fedprox_penalty(model: torch.nn.Module, global_params: Mapping[str, torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx proximal term ``mu / 2 * ||w - w_global||^2`` over the trainable parameters."""
    terms = [
        (param - global_params[name]).pow(2).sum()
        for name, param in model.named_parameters()
        if param.requires_grad and name in global_params
    ]
    if not terms:
        return torch.zeros((), device=next(model.parameters()).device)
    return 0.5 * mu * torch.stack(terms).sum()


def check_finite_loss(loss: float, max_loss: float, *, epoch: int, step: int) -> None:
    """Raise :class:`TrainingDiverged` for a NaN/inf or exploding loss."""
    if not math.isfinite(loss):
        raise TrainingDiverged(f"loss is {loss} (not finite)", epoch=epoch, step=step)
    if loss > max_loss:
        raise TrainingDiverged(f"loss {loss:.4g} exceeds the limit {max_loss:.4g} (exploding)", epoch=epoch, step=step)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + epoch * 1_009 + rank) % (2**31 - 1)


def early_stop_update(best: float | None, bad: int, value: float, min_delta: float) -> tuple[float, int, bool]:
    """New (best, validations without gain, improved?) after a validation Dice of ``value``."""
    if best is None or value > best + min_delta:
        return value, 0, True
    return best, bad + 1, False


# --- building blocks -----------------------------------------------------------------------------------


def _sampling_transform(config: TrainingConfig) -> list[Any]:
    patch = config.patch
    keys = ["image", "label"]
    if patch.sampler == "whole":
        # every volume padded to the patch (the plan's whole-crop size): one shape per batch, no crops
        return [SpatialPadd(keys, spatial_size=patch.size), DivisiblePadd(keys, k=patch.divisible)]
    pad = SpatialPadd(keys, spatial_size=patch.size)  # volumes smaller than a patch are padded, not refused
    if patch.sampler == "uniform":
        return [pad, RandSpatialCropd(keys, roi_size=patch.size, random_size=False)]
    return [
        pad,
        RandCropByPosNegLabeld(
            keys,
            label_key="label",
            spatial_size=patch.size,
            pos=patch.pos,
            neg=patch.neg,
            num_samples=patch.num_samples,
            image_key="image",
            image_threshold=0,
        ),
    ]


def _optimizer(config: TrainingConfig, params: Any) -> torch.optim.Optimizer:
    opt = config.optimizer
    if opt.name == "sgd":
        return torch.optim.SGD(
            params, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov, weight_decay=opt.weight_decay
        )
    return torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay)


# --- schedule and carried optimiser state (federated rounds: docs/training.md "Federated training") ---


def _scheduler(config: TrainingConfig, optimizer: torch.optim.Optimizer, offset: int, total: int) -> Any:
    """LambdaLR over the whole training's schedule: local epoch ``i`` of this call is global ``offset + i``."""
    sched, base = config.schedule, config.optimizer.lr
    lr_factor(sched, offset, total, base_lr=base)  # an impossible schedule fails before any training
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(sched, offset + i, total, base_lr=base))


def _carry_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """Load the moments and step counts of an earlier call; the hyper-parameters stay the config's (the
    schedule, not the earlier call, decides the learning rate)."""
    hyper = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(copy.deepcopy(dict(state)))  # the optimiser steps its tensors in place
    except (ValueError, KeyError) as exc:
        raise ValueError(f"the carried optimiser state does not fit the network: {exc}") from exc
    for group, fresh in zip(optimizer.param_groups, hyper, strict=True):
        for key in [k for k in group if k != "params" and k not in fresh]:
            del group[key]  # e.g. the earlier scheduler's initial_lr
        group.update(fresh)


def _cpu_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    state = optimizer.state_dict()
    return {
        "state": {
            index: {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
            for index, s in state["state"].items()
        },
        "param_groups": [dict(group) for group in state["param_groups"]],
    }


# --- end of schedule and carried optimiser state ---


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises torch.distributed from torchrun's environment on first use."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _cpu_state(model: torch.nn.Module) -> StateDict:
    return {k: v.detach().to("cpu", copy=True) for k, v in _unwrap(model).state_dict().items()}


def nnunet_supervision_weights(heads: int) -> list[float]:
    """nnU-Net's deep-supervision weights for the main output and ``heads`` lower heads: 1/2**i, normalised."""
    weights = [0.5**i for i in range(heads + 1)]
    return [w / sum(weights) for w in weights]


def supervision_outputs(network: torch.nn.Module, output: torch.Tensor) -> list[torch.Tensor] | None:
    """The outputs deep supervision scores, each at its own resolution: the main output, then DynUNet's
    heads from the finest down; None when the network is not deeply supervised (or not in training mode).

    Why the heads and not the forward result: in training mode DynUNet returns the heads *upsampled* to
    the main output's size, stacked on dim 1; nnU-Net instead downsamples the label to each head, which
    the native-size heads DynUNet keeps in ``network.heads`` during the forward allow.
    """
    if not (network.training and getattr(network, "deep_supervision", False)):
        return None
    heads = list(cast(Sequence[torch.Tensor], network.heads))
    return [output[:, 0] if output.dim() == 6 else output, *heads]


def supervised_loss(loss_fn: Any, output: torch.Tensor | list[torch.Tensor], label: torch.Tensor) -> torch.Tensor:
    """``loss_fn`` of the output, or (a list from :func:`supervision_outputs`) MONAI's DeepSupervisionLoss:
    each output against the label downsampled (nearest) to its size, weighted as nnU-Net does."""
    if isinstance(output, list):
        weights = nnunet_supervision_weights(len(output) - 1)
        loss = DeepSupervisionLoss(loss_fn, weights=weights)
        return cast(torch.Tensor, loss([o.float() for o in output], label.float()))
    return cast(torch.Tensor, loss_fn(output.float(), label))


def evaluate_dice(
    model: torch.nn.Module,
    cases: CaseSource,
    config: TrainingConfig,
    device: torch.device,
) -> tuple[float, list[float]]:
    """Mean foreground Dice over ``cases`` (MONAI DiceMetric on sliding-window argmax predictions)."""
    val = config.validation
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
    to_onehot = AsDiscrete(to_onehot=config.num_classes)
    model.eval()
    use_bf16 = config.bf16 and device.type == "cuda"
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        for index in range(len(cases)):
            case = cases[index]
            image = torch.as_tensor(case["image"]).float().unsqueeze(0).to(device)
            label = torch.as_tensor(case["label"]).long()
            logits = sliding_window_inference(
                image, val.roi_size, val.sw_batch_size, model, overlap=val.overlap, mode="gaussian"
            )
            pred = torch.as_tensor(logits).float().argmax(1, keepdim=True).cpu()
            metric(
                y_pred=torch.as_tensor(to_onehot(pred[0])).unsqueeze(0),
                y=torch.as_tensor(to_onehot(label)).unsqueeze(0),
            )
    per_class = metric.aggregate()
    values = [float(v) for v in torch.as_tensor(per_class).flatten()]
    finite = [v for v in values if math.isfinite(v)]
    return (sum(finite) / len(finite) if finite else 0.0), values


# --- the loop ------------------------------------------------------------------------------------------


def train_local(
    config: TrainingConfig,
    train_cases: CaseSource,
    val_cases: CaseSource,
    initial_state: Mapping[str, torch.Tensor] | None,
    *,
    epochs: int | None = None,
    fedprox_mu: float = 0.0,
    augment: Callable[[Any], Any] | None = None,
    load_checkpoint: Callable[[], dict[str, Any] | None] | None = None,
    save_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    progress: Callable[[EpochRecord], None] | None = None,
    device: torch.device | str | None = None,
    schedule_offset: int = 0,
    schedule_total: int | None = None,
    optimizer_state: Mapping[str, Any] | None = None,
) -> LocalResult:
    """Train from ``initial_state`` (or fresh weights seeded by ``config.seed``) and return the result.

    ``train_cases``/``val_cases`` are cached-case dicts (or a Dataset of them); ``augment`` is the
    preprocessing spec's augmentation Compose, applied before patch sampling. ``load_checkpoint`` returns
    the last dict given to ``save_checkpoint`` (called after every epoch on rank 0) or None; training then
    continues after that epoch. Under ``torchrun`` the model is wrapped in DistributedDataParallel,
    batches are sharded with a DistributedSampler and only rank 0 saves checkpoints or reports progress.
    Raises :class:`TrainingDiverged` for a NaN/inf/exploding loss and ValueError for unusable data.

    A federated round is one slice of a longer training: ``schedule_offset`` is the global epoch this call
    starts at and ``schedule_total`` the whole schedule's length (defaults 0 and ``epochs``: the call is the
    whole training); the learning rate and every per-epoch seed follow the global epoch. ``optimizer_state``
    (an earlier call's ``LocalResult.optimizer_state``) continues its moments instead of fresh ones.

    ``config.task`` chooses the loop: classification goes to
    :func:`shared.training.classification.train_classifier` (same arguments, same result type, the
    validation AUC instead of Dice); detection has no training yet and raises ConfigError.
    """
    if config.task == "classification":
        from shared.training.classification import train_classifier

        return cast(
            LocalResult,
            train_classifier(
                config,
                train_cases,
                val_cases,
                initial_state,
                epochs=epochs,
                fedprox_mu=fedprox_mu,
                augment=augment,
                load_checkpoint=load_checkpoint,
                save_checkpoint=save_checkpoint,
                progress=progress,
                device=device,
                schedule_offset=schedule_offset,
                schedule_total=schedule_total,
                optimizer_state=optimizer_state,
            ),
        )
    if config.task == "detection":
        raise ConfigError("detection training is not implemented yet (docs/classification.md): only its metrics are")
    if len(train_cases) == 0:
        raise ValueError("no training cases: the site has nothing to train on")
    if fedprox_mu < 0:
        raise ValueError(f"fedprox_mu must be >= 0, got {fedprox_mu}")
    total_epochs = epochs if epochs is not None else config.epochs
    if total_epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {total_epochs}")
    if schedule_offset < 0:
        raise ValueError(f"schedule_offset must be >= 0, got {schedule_offset}")
    rank, world = _distributed()
    if device is None:
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    torch.manual_seed(config.seed)
    network = build_network(config, config.in_channels, config.num_classes).to(device)
    if initial_state is not None:
        try:
            network.load_state_dict(initial_state)
        except RuntimeError as exc:
            raise ValueError(f"starting weights do not fit the configured {config.network.name}: {exc}") from exc
    global_params = {k: v.detach().clone().to(device) for k, v in network.named_parameters()}
    model: torch.nn.Module = network
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            network, device_ids=[device] if device.type == "cuda" else None
        )

    optimizer = _optimizer(config, model.parameters())
    if optimizer_state is not None:
        _carry_optimizer_state(optimizer, optimizer_state)
    scheduler = _scheduler(config, optimizer, schedule_offset, schedule_total or total_epochs)
    loss_fn = DiceCELoss(
        to_onehot_y=True,
        softmax=True,
        include_background=config.loss.include_background,
        lambda_dice=config.loss.lambda_dice,
        lambda_ce=config.loss.lambda_ce,
    )
    transform = Compose([*([augment] if augment is not None else []), *_sampling_transform(config)])
    dataset = Dataset(data=cast(Sequence[Case], train_cases), transform=transform)  # MONAI only indexes it
    sampler: DistributedSampler[Any] = DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=True, seed=config.seed
    )
    collate = pad_list_data_collate if config.patch.sampler == "whole" else list_data_collate

    start_epoch, history, best, bad = 0, [], None, 0
    best_state: StateDict | None = None
    best_epoch: int | None = None
    checkpoint = load_checkpoint() if load_checkpoint is not None else None
    if checkpoint is not None:
        _unwrap(model).load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict({"lr_lambdas": [None], **checkpoint["scheduler"]})  # pre-LambdaLR too
        start_epoch = int(checkpoint["epoch"])
        history = [EpochRecord(**h) for h in checkpoint["history"]]
        best, bad = checkpoint.get("best"), int(checkpoint.get("bad", 0))
        best_state, best_epoch = checkpoint.get("best_state"), checkpoint.get("best_epoch")
        log.info("resuming local training after epoch %d of %d", start_epoch, total_epochs)
    use_bf16 = config.bf16 and device.type == "cuda"
    stopped_early = False
    patience = config.early_stopping.patience
    if patience is not None and history and bad >= patience:
        stopped_early = True  # the checkpoint was written right after the stopping validation

    for epoch in range(start_epoch + 1, total_epochs + 1):
        if stopped_early:
            break
        started = time.perf_counter()
        seed = epoch_seed(config.seed, schedule_offset + epoch, rank)  # the global epoch: rounds differ
        torch.manual_seed(seed)
        transform.set_random_state(seed=seed)
        sampler.set_epoch(schedule_offset + epoch)
        loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, num_workers=0, collate_fn=collate)
        model.train()
        loss_sum, steps, samples = 0.0, 0, 0
        for step, batch in enumerate(loader, start=1):
            image = batch["image"].float().to(device)
            label = batch["label"].long().to(device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                output = model(image)
                heads = supervision_outputs(network, output)
                loss = supervised_loss(loss_fn, heads if heads is not None else output, label)
            check_finite_loss(float(loss.detach()), config.divergence.max_loss, epoch=epoch, step=step)
            total = loss + fedprox_penalty(network, global_params, fedprox_mu) if fedprox_mu > 0 else loss
            total.backward()
            if config.grad_clip_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
                if not torch.isfinite(norm):
                    raise TrainingDiverged(f"gradient norm is {float(norm)}", epoch=epoch, step=step)
            optimizer.step()
            loss_sum += float(loss.detach())
            steps += 1
            samples += image.shape[0]
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        stats = torch.tensor([loss_sum, steps, samples], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(stats)
        train_loss = float(stats[0]) / max(float(stats[1]), 1.0)
        check_finite_loss(train_loss, config.divergence.max_loss, epoch=epoch, step=int(stats[1]))
        val_dice: float | None = None
        per_class: list[float] | None = None
        if val_cases and (epoch % config.validation.every == 0 or epoch == total_epochs):
            # Every rank validates the same (small) set with the same weights: no gather needed.
            val_dice, per_class = evaluate_dice(_unwrap(model), val_cases, config, device)
            best, bad, improved = early_stop_update(best, bad, val_dice, config.early_stopping.min_delta)
            if improved:
                best_state, best_epoch = _cpu_state(model), epoch
            if patience is not None and bad >= patience:
                stopped_early = True
        seconds = time.perf_counter() - started
        record = EpochRecord(
            epoch=epoch,
            train_loss=train_loss,
            val_dice=val_dice,
            lr=lr,
            seconds=seconds,
            samples_per_second=float(stats[2]) / seconds if seconds > 0 else 0.0,
            val_dice_per_class=per_class,
            samples=int(stats[2]),
        )
        history.append(record)
        log.info(
            "epoch %d/%d loss %.4f val_dice %s (%.1f samples/s)",
            epoch,
            total_epochs,
            train_loss,
            "-" if val_dice is None else f"{val_dice:.4f}",
            record.samples_per_second,
        )
        if rank == 0:
            if save_checkpoint is not None:
                save_checkpoint(
                    {
                        "epoch": epoch,
                        "model": _cpu_state(model),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "history": [asdict(h) for h in history],
                        "best": best,
                        "bad": bad,
                        "best_state": best_state,
                        "best_epoch": best_epoch,
                        "rng": torch.get_rng_state(),
                    }
                )
            if progress is not None:
                progress(record)

    last = history[-1]
    metrics = {"train_loss": last.train_loss, "epochs": float(len(history))}
    dices = [h.val_dice for h in history if h.val_dice is not None]
    if dices:
        metrics["val_dice"] = dices[-1]
        metrics["best_val_dice"] = max(dices)
    if best_epoch is not None:
        metrics["best_epoch"] = float(best_epoch)
    return LocalResult(
        state_dict=_cpu_state(model),
        num_samples=len(train_cases),
        metrics=metrics,
        history=history,
        stopped_early=stopped_early,
        resumed_from_epoch=start_epoch,
        best_state_dict=best_state,
        best_epoch=best_epoch,
        optimizer_state=_cpu_optimizer_state(optimizer),
    )
