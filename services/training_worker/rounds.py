"""One federated round at one site: validate the task, train from the global weights, deliver the update.

Delivery protocol (docs/contracts.md, keys from :mod:`shared.contracts.layout`): everything of an attempt lives under
``federated/{run_id}/round-{r:04d}/{site}/{attempt_id}/``; ``weights.pt`` is written first and
``update.json`` last, so the existence of ``update.json`` means "delivered" and a redelivered task that
finds it returns it without training again (a result is never produced twice). The checkpoint is
rewritten after every epoch; a task redelivered after the worker was killed resumes from it.

What a site keeps to itself lives under ``site-private/{site}/federated/{run_id}/`` (outside the aggregator's
``federated/`` prefix): the checkpoint, and the site state it carries from round to round (its optimiser
state when the task says ``keep_optimizer_state``, its normalisation layers under ``local_norm_layers``), one
immutable ``site-state.pt`` per round it trained. A round starts from the newest one of an earlier round, so
a site that missed rounds goes on from its last, and a redelivered task reads the same one again.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.training_worker import metrics
from services.training_worker.context import TrainingWorkerContext
from shared.contracts import layout, messages
from shared.contracts.codec import state_from_bytes, state_to_bytes
from shared.contracts.progress import RunEvent
from shared.privacy import clip_update
from shared.proto.voxelflow.v1 import training_pb2
from shared.storage import ObjectNotFoundError
from shared.tasks import PermanentTaskError
from shared.training import EpochRecord, TrainingConfig, TrainingDiverged, train_local
from shared.training.data import MissingCachedCase, UnknownDatasetVersion, load_site_data
from shared.training.federated import config_norm_keys

log = logging.getLogger("voxelflow.training_worker")


def next_global_key(task: training_pb2.TrainingRoundTask) -> str:
    """The weights the next round starts from: once they exist, this round is aggregated (docs/contracts.md)."""
    return layout.global_key(task.run_id, task.round + 1)


@dataclass(frozen=True)
class RoundKeys:
    weights: str
    update: str
    checkpoint: str

    @classmethod
    def for_task(cls, task: training_pb2.TrainingRoundTask) -> RoundKeys:
        at = (task.run_id, task.round, task.site, task.task_attempt_id)
        return cls(layout.weights_key(*at), layout.update_key(*at), layout.checkpoint_key(*at))


def parse_task(message: dict[str, Any], site: str) -> training_pb2.TrainingRoundTask:
    """The TrainingRoundTask in ``message``; PermanentTaskError when it is malformed or for another site."""
    try:
        task = messages.from_dict(message, training_pb2.TrainingRoundTask)
    except messages.MessageError as exc:
        raise PermanentTaskError(f"not a TrainingRoundTask: {exc}") from exc
    missing = [
        name
        for name in ("run_id", "site", "dataset_version_id", "global_weights_uri", "training_config_uri")
        if not getattr(task, name)
    ]
    if not task.task_attempt_id:
        missing.append("task_attempt_id")
    if missing:
        raise PermanentTaskError(f"round task lacks {', '.join(missing)}")
    for name in ("run_id", "site", "task_attempt_id"):
        if "/" in getattr(task, name) or getattr(task, name) in (".", ".."):
            raise PermanentTaskError(f"round task field {name}={getattr(task, name)!r} is not a valid key segment")
    if task.round < 0 or task.local_epochs < 0 or task.fedprox_mu < 0:
        raise PermanentTaskError("round, local_epochs and fedprox_mu must not be negative")
    if not (task.dp_clip_norm >= 0 and math.isfinite(task.dp_clip_norm)):
        raise PermanentTaskError(f"dp_clip_norm must be 0 (off) or a positive number, got {task.dp_clip_norm}")
    if task.site != site:
        raise PermanentTaskError(f"round task for site {task.site!r} reached the worker of site {site!r}")
    return task


def clip_to_bound(
    global_state: dict[str, Any], local_state: dict[str, Any], clip_norm: float
) -> tuple[dict[str, Any], float]:
    """The local weights with their update (local - global) clipped to ``clip_norm``, and the update's norm
    before clipping (which stays at the site: only the clipped update leaves it)."""
    import torch

    def arrays(state: dict[str, Any]) -> dict[str, Any]:
        return {key: value.detach().cpu().numpy() for key, value in state.items()}

    clipped, norm = clip_update(arrays(global_state), arrays(local_state), clip_norm)
    return {key: torch.from_numpy(value) for key, value in clipped.items()}, norm


def last_site_state(ctx: TrainingWorkerContext, task: training_pb2.TrainingRoundTask) -> dict[str, Any] | None:
    """The site state of the latest earlier round this site trained in this run (None before its first)."""
    rounds = [
        r
        for key in ctx.store.list(layout.site_run_prefix(task.run_id, task.site))
        if (r := layout.parse_site_state_key(task.run_id, task.site, key)) is not None and r < task.round
    ]
    if not rounds:
        return None
    return state_from_bytes(ctx.store.get_bytes(layout.site_state_key(task.run_id, task.site, max(rounds))))


def _load(ctx: TrainingWorkerContext, key: str, what: str) -> bytes:
    try:
        return ctx.store.get_bytes(key)
    except ObjectNotFoundError:
        raise PermanentTaskError(f"{what} {key!r} does not exist in object storage") from None


def run_round(
    ctx: TrainingWorkerContext,
    message: dict[str, Any],
    report: Callable[[dict[str, Any]], None] = lambda meta: None,
) -> dict[str, Any]:
    """Run (or resume, or replay) one round task; returns the ModelUpdate as a dict."""
    site = ctx.settings.site
    try:
        task = parse_task(message, site)
    except PermanentTaskError:
        metrics.rounds_total.labels(site, "refused").inc()
        raise
    keys = RoundKeys.for_task(task)
    if ctx.store.exists(keys.update):
        metrics.rounds_total.labels(site, "replayed").inc()
        log.info("update already delivered for %s: not training again", keys.update)
        return json.loads(ctx.store.get_bytes(keys.update))
    if ctx.store.exists(next_global_key(task)):
        # a straggler whose task starts after the round closed: its update would be discarded as late
        metrics.rounds_total.labels(site, "skipped").inc()
        log.warning("round %d of %s is already aggregated: not training", task.round, task.run_id)
        return {"skipped": f"round {task.round} of {task.run_id} was aggregated before this task started"}

    try:
        config = TrainingConfig.from_yaml(_load(ctx, task.training_config_uri, "training configuration"))
        global_state = state_from_bytes(_load(ctx, task.global_weights_uri, "global weights"))
        data = load_site_data(ctx.store, task.dataset_version_id, site)
        if len(data.train) == 0:
            raise PermanentTaskError(f"site {site!r} has no cases in holdout.train of {task.dataset_version_id}")
        carried = last_site_state(ctx, task) if task.keep_optimizer_state or task.local_norm_layers else None
    except (ValueError, UnknownDatasetVersion, MissingCachedCase) as exc:
        metrics.rounds_total.labels(site, "refused").inc()
        raise PermanentTaskError(str(exc)) from exc

    def load_checkpoint() -> dict[str, Any] | None:
        try:
            data = ctx.store.get_bytes(keys.checkpoint)
        except ObjectNotFoundError:
            return None
        checkpoint = state_from_bytes(data)
        log.info("resuming %s after epoch %s", keys.checkpoint, checkpoint["epoch"])
        return checkpoint

    def save_checkpoint(checkpoint: dict[str, Any]) -> None:
        ctx.store.put_bytes(keys.checkpoint, state_to_bytes(checkpoint))

    epochs = task.local_epochs or config.epochs
    start_state = dict(global_state)
    norm_keys = config_norm_keys(config) if task.local_norm_layers else frozenset()
    if norm_keys and carried is not None and carried.get("norm"):
        start_state.update(carried["norm"])  # FedBN: the global weights, but this site's own norm layers
    optimizer_state = carried.get("optimizer") if carried is not None and task.keep_optimizer_state else None

    def on_epoch(record: EpochRecord) -> None:
        labels = (site, task.run_id)
        metrics.epochs_total.labels(*labels).inc()
        metrics.samples_per_second.labels(*labels).set(record.samples_per_second)
        metrics.train_loss.labels(*labels).set(record.train_loss)
        if record.val_dice is not None:
            metrics.val_dice.labels(*labels).set(record.val_dice)
        report({"epoch": record.epoch, "epochs": epochs, "loss": record.train_loss, "val_dice": record.val_dice})
        ctx.progress.publish(
            RunEvent(
                kind="epoch",
                run_id=task.run_id,
                round=task.round,
                site=site,
                epoch=record.epoch,
                epochs=epochs,
                loss=record.train_loss,
                val_dice=record.val_dice,
                seconds=record.seconds,
            )
        )

    try:
        result = train_local(
            config,
            data.train,
            data.val,
            start_state,
            augment=data.augment,
            epochs=epochs,
            schedule_offset=task.schedule_offset,
            schedule_total=task.schedule_total or None,
            optimizer_state=optimizer_state,
            fedprox_mu=task.fedprox_mu,
            load_checkpoint=load_checkpoint,
            save_checkpoint=save_checkpoint,
            progress=on_epoch,
            device=ctx.settings.device,
        )
    except TrainingDiverged as exc:
        metrics.rounds_total.labels(site, "diverged").inc()
        raise PermanentTaskError(str(exc)) from exc
    except ValueError as exc:  # e.g. global weights of another architecture than the configuration's
        metrics.rounds_total.labels(site, "refused").inc()
        raise PermanentTaskError(str(exc)) from exc

    state = result.state_dict
    if task.keep_optimizer_state or task.local_norm_layers:  # before the update: delivered means carried
        site_state = {
            "round": task.round,
            "optimizer": result.optimizer_state if task.keep_optimizer_state else None,
            "norm": {key: state[key] for key in sorted(norm_keys)} if norm_keys else None,
        }
        ctx.store.put_bytes(layout.site_state_key(task.run_id, site, task.round), state_to_bytes(site_state))
    if task.dp_clip_norm > 0:
        state, norm = clip_to_bound(global_state, state, task.dp_clip_norm)
        log.info("round %d: update norm %.4g clipped to %.4g before delivery", task.round, norm, task.dp_clip_norm)
    ctx.store.put_bytes(keys.weights, state_to_bytes(state))
    update = training_pb2.ModelUpdate(
        run_id=task.run_id,
        round=task.round,
        site=site,
        task_attempt_id=task.task_attempt_id,
        weights_uri=keys.weights,
        num_samples=result.num_samples,
        metrics={
            **result.metrics,
            "resumed_from_epoch": float(result.resumed_from_epoch),
            "schedule_offset": float(task.schedule_offset),
            # which earlier round's site state this round started from; -1 = none (fresh optimiser)
            "carried_from_round": float(carried["round"]) if carried is not None else -1.0,
        },
        finished_at=dt.datetime.now(dt.UTC).isoformat(),
        clip_norm=task.dp_clip_norm,
    )
    body = messages.to_dict(update)
    ctx.store.put_bytes(keys.update, json.dumps(body).encode(), content_type="application/json")  # written last
    metrics.rounds_total.labels(site, "resumed" if result.resumed_from_epoch else "trained").inc()
    log.info("delivered %s (%d samples, %s)", keys.update, result.num_samples, result.metrics)
    return body
