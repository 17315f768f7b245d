"""Classification training (``task: classification``): one label per volume, through the loop's own rules.

``train_local`` hands a classification config to :func:`train_classifier`, which keeps the segmentation
loop's contract so the worker, the centralised CLI and the benchmark can call either the same way:
everything random in epoch ``e`` is seeded from ``(config.seed, global epoch)`` at its start, the learning
rate follows the whole training's schedule (``schedule_offset``/``schedule_total`` for a federated round),
the validation metric picks the kept weights (``best_state_dict``; here the validation ROC AUC instead of
Dice), a NaN or exploding loss raises :class:`TrainingDiverged`, and a checkpoint after every epoch lets
a rerun continue where it stopped. After training the operating threshold is chosen on the validation
cases with the kept weights (``metrics["threshold"]``), so test figures never choose their own threshold.

Not here yet: DistributedDataParallel (one process only), deep supervision, post-processing.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any, cast

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import (
    Compose,
    RandAffined,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from torch.utils.data.distributed import DistributedSampler

from shared.evaluation.classification import choose_threshold, roc_auc
from shared.training.config import ConfigError, TrainingConfig
from shared.training.networks import build_network

log = logging.getLogger("voxelflow.training.classification")


def classification_augmentation() -> Compose:
    """MONAI dictionary transforms on ``image`` only (the label is one number per volume): flips on every
    axis, a small affine (rotation up to 0.2 rad, scale 10 %), intensity scale and shift by up to 10 %.

    Why these: a gland's left/right and scanner orientation carry no diagnosis, its size and outline do;
    rotations and scalings beyond a few degrees or percent would change the very shape the label is about.
    """
    keys = ["image"]
    return Compose(
        [
            *[RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(3)],
            RandAffined(
                keys,
                prob=0.5,
                rotate_range=(0.2, 0.2, 0.2),
                scale_range=(0.1, 0.1, 0.1),
                mode="bilinear",
                padding_mode="zeros",
            ),
            RandScaleIntensityd(keys, factors=0.1, prob=0.5),
            RandShiftIntensityd(keys, offsets=0.1, prob=0.5),
        ]
    )


def probabilities(logits: torch.Tensor, config: TrainingConfig) -> torch.Tensor:
    """(N,) positive-class probabilities for BCE / binary CE, (N, K) class probabilities for CE, K > 2."""
    logits = logits.float()
    if config.loss.name == "bce":
        return torch.sigmoid(logits.reshape(-1))
    probs = torch.softmax(logits, dim=1)
    return probs[:, 1] if probs.shape[1] == 2 else probs


def predict_probabilities(
    network: torch.nn.Module,
    cases: Sequence[Mapping[str, Any]],
    config: TrainingConfig,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, labels) of ``cases`` under ``network`` in eval mode, in case order."""
    network.eval()
    device = torch.device(device)
    probs: list[torch.Tensor] = []
    labels: list[int] = []
    use_bf16 = config.bf16 and device.type == "cuda"
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        for start in range(0, len(cases), batch_size):
            chunk = [cases[i] for i in range(start, min(start + batch_size, len(cases)))]
            image = torch.stack([torch.as_tensor(c["image"]).float() for c in chunk]).to(device)
            probs.append(probabilities(network(image), config).float().cpu())
            labels.extend(int(c["label"]) for c in chunk)
    return torch.cat(probs).numpy(), np.asarray(labels, dtype=np.int64)


def validation_auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC (binary) or the macro one-vs-rest AUC (more classes); nan when a class is missing."""
    try:
        if probs.ndim == 1:
            return roc_auc(labels, probs)
        return float(np.mean([roc_auc((labels == k).astype(int), probs[:, k]) for k in range(probs.shape[1])]))
    except ValueError:
        return math.nan


def _loss(config: TrainingConfig, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if config.loss.name == "bce":
        weight = None if config.loss.pos_weight is None else torch.tensor([config.loss.pos_weight], device=device)
        bce = torch.nn.BCEWithLogitsLoss(pos_weight=weight)
        return lambda logits, label: bce(logits.float().reshape(-1), label.float())
    ce = torch.nn.CrossEntropyLoss()
    return lambda logits, label: ce(logits.float(), label.long())


def _collate(batch: list[Mapping[str, Any]]) -> dict[str, Any]:
    return {
        "image": torch.stack([torch.as_tensor(b["image"]).float() for b in batch]),
        "label": torch.stack([torch.as_tensor(b["label"]).long().reshape(()) for b in batch]),
    }


def train_classifier(
    config: TrainingConfig,
    train_cases: Any,
    val_cases: Any,
    initial_state: Mapping[str, torch.Tensor] | None,
    *,
    epochs: int | None = None,
    fedprox_mu: float = 0.0,
    augment: Callable[[Any], Any] | None = None,
    load_checkpoint: Callable[[], dict[str, Any] | None] | None = None,
    save_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    progress: Callable[[Any], None] | None = None,
    device: torch.device | str | None = None,
    schedule_offset: int = 0,
    schedule_total: int | None = None,
    optimizer_state: Mapping[str, Any] | None = None,
) -> Any:
    """Train a classifier; the arguments and the result (:class:`~shared.training.local.LocalResult`) are
    ``train_local``'s. ``augment`` defaults to :func:`classification_augmentation` when the config's
    ``classification.augment`` is on. ``val_dice`` in the records stays None; ``val_auc`` carries the metric."""
    from shared.training.local import (
        EpochRecord,
        LocalResult,
        TrainingDiverged,
        _carry_optimizer_state,
        _cpu_optimizer_state,
        _cpu_state,
        _optimizer,
        _scheduler,
        check_finite_loss,
        early_stop_update,
        epoch_seed,
        fedprox_penalty,
    )

    if config.task != "classification":
        raise ConfigError(f"train_classifier needs task classification, not {config.task}")
    if len(train_cases) == 0:
        raise ValueError("no training cases: the site has nothing to train on")
    if fedprox_mu < 0:
        raise ValueError(f"fedprox_mu must be >= 0, got {fedprox_mu}")
    total_epochs = epochs if epochs is not None else config.epochs
    if total_epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {total_epochs}")
    if schedule_offset < 0:
        raise ValueError(f"schedule_offset must be >= 0, got {schedule_offset}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    torch.manual_seed(config.seed)
    network = build_network(config, config.in_channels, config.num_classes).to(device)
    if initial_state is not None:
        try:
            network.load_state_dict(initial_state)
        except RuntimeError as exc:
            raise ValueError(f"starting weights do not fit the configured {config.network.name}: {exc}") from exc
    global_params = {k: v.detach().clone().to(device) for k, v in network.named_parameters()}
    optimizer = _optimizer(config, network.parameters())
    if optimizer_state is not None:
        _carry_optimizer_state(optimizer, optimizer_state)
    scheduler = _scheduler(config, optimizer, schedule_offset, schedule_total or total_epochs)
    loss_fn = _loss(config, device)
    if augment is None and config.classification.augment:
        augment = classification_augmentation()
    transform = Compose([augment] if augment is not None else [])
    dataset = Dataset(data=cast(Sequence[Any], train_cases), transform=transform)
    sampler: DistributedSampler[Any] = DistributedSampler(
        dataset, num_replicas=1, rank=0, shuffle=True, seed=config.seed
    )

    start_epoch, history, best, bad = 0, [], None, 0
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch: int | None = None
    checkpoint = load_checkpoint() if load_checkpoint is not None else None
    if checkpoint is not None:
        network.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict({"lr_lambdas": [None], **checkpoint["scheduler"]})
        start_epoch = int(checkpoint["epoch"])
        history = [EpochRecord(**h) for h in checkpoint["history"]]
        best, bad = checkpoint.get("best"), int(checkpoint.get("bad", 0))
        best_state, best_epoch = checkpoint.get("best_state"), checkpoint.get("best_epoch")
    use_bf16 = config.bf16 and device.type == "cuda"
    patience = config.early_stopping.patience
    stopped_early = bool(patience is not None and history and bad >= patience)

    for epoch in range(start_epoch + 1, total_epochs + 1):
        if stopped_early:
            break
        started = time.perf_counter()
        seed = epoch_seed(config.seed, schedule_offset + epoch)
        torch.manual_seed(seed)
        transform.set_random_state(seed=seed)
        sampler.set_epoch(schedule_offset + epoch)
        loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, num_workers=0, collate_fn=_collate)
        network.train()
        loss_sum, steps, samples = 0.0, 0, 0
        for step, batch in enumerate(loader, start=1):
            image, label = batch["image"].to(device), batch["label"].to(device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = loss_fn(network(image), label)
            check_finite_loss(float(loss.detach()), config.divergence.max_loss, epoch=epoch, step=step)
            total = loss + fedprox_penalty(network, global_params, fedprox_mu) if fedprox_mu > 0 else loss
            total.backward()
            if config.grad_clip_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(network.parameters(), config.grad_clip_norm)
                if not torch.isfinite(norm):
                    raise TrainingDiverged(f"gradient norm is {float(norm)}", epoch=epoch, step=step)
            optimizer.step()
            loss_sum += float(loss.detach())
            steps += 1
            samples += image.shape[0]
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        train_loss = loss_sum / max(steps, 1)
        val_auc: float | None = None
        if val_cases and (epoch % config.validation.every == 0 or epoch == total_epochs):
            val_auc = validation_auc(*predict_probabilities(network, val_cases, config, device))
            if math.isfinite(val_auc):
                best, bad, improved = early_stop_update(best, bad, val_auc, config.early_stopping.min_delta)
                if improved:
                    best_state, best_epoch = _cpu_state(network), epoch
                if patience is not None and bad >= patience:
                    stopped_early = True
        seconds = time.perf_counter() - started
        record = EpochRecord(
            epoch=epoch,
            train_loss=train_loss,
            val_dice=None,
            lr=lr,
            seconds=seconds,
            samples_per_second=samples / seconds if seconds > 0 else 0.0,
            samples=samples,
            val_auc=val_auc,
        )
        history.append(record)
        log.info("epoch %d/%d loss %.4f val_auc %s", epoch, total_epochs, train_loss, val_auc)
        if save_checkpoint is not None:
            save_checkpoint(
                {
                    "epoch": epoch,
                    "model": _cpu_state(network),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "history": [asdict(h) for h in history],
                    "best": best,
                    "bad": bad,
                    "best_state": best_state,
                    "best_epoch": best_epoch,
                }
            )
        if progress is not None:
            progress(record)

    last = history[-1]
    metrics: dict[str, float] = {"train_loss": last.train_loss, "epochs": float(len(history))}
    aucs = [h.val_auc for h in history if h.val_auc is not None and math.isfinite(h.val_auc)]
    if aucs:
        metrics["val_auc"] = aucs[-1]
        metrics["best_val_auc"] = max(aucs)
    if best_epoch is not None:
        metrics["best_epoch"] = float(best_epoch)
    result = LocalResult(
        state_dict=_cpu_state(network),
        num_samples=len(train_cases),
        metrics=metrics,
        history=history,
        stopped_early=stopped_early,
        resumed_from_epoch=start_epoch,
        best_state_dict=best_state,
        best_epoch=best_epoch,
        optimizer_state=_cpu_optimizer_state(optimizer),
    )
    if val_cases and config.num_classes == 2:
        network.load_state_dict(result.kept_state(config.keep))
        probs, labels = predict_probabilities(network, val_cases, config, device)
        try:
            result.metrics["threshold"] = choose_threshold(
                labels,
                probs,
                config.classification.threshold,
                config.classification.target_sensitivity,
            )
        except ValueError as exc:  # a validation set with one class only: no operating point to choose
            log.warning("no threshold chosen on validation: %s", exc)
    return result
