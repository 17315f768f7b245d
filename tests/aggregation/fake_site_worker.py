"""A test-only stand-in for the training worker of each site.

It consumes the real ``training.{site}`` queues through Celery and answers ``training.train_round`` per
the contract (weights.pt, then update.json as a ModelUpdate, under the attempt's folder), but instead
of training it writes a deterministic update: global + a site- and round-specific constant. That lets
the aggregation tests check exact weights and exercise quorum, timeouts, failures, duplicates, late
updates and crash/resume without training networks. The real training worker is exercised end to end
by the lead after the branches are merged.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from celery import Celery

from services.aggregation import federated_storage as fs
from shared.contracts import messages
from shared.contracts.progress import ProgressPublisher, RunEvent
from shared.privacy import clip_update
from shared.proto.voxelflow.v1 import training_pb2
from shared.storage import open_object_store
from shared.tasks import PermanentTaskError, create_celery_app

log = logging.getLogger("tests.fake_site_worker")
SITES = ("site-a", "site-b", "site-c")
NUM_SAMPLES = {"site-a": 10, "site-b": 30, "site-c": 20}
SITE_FACTOR = {"site-a": 0.01, "site-b": -0.02, "site-c": 0.03}


def site_delta(site: str, round_index: int) -> float:
    return SITE_FACTOR[site] * (round_index + 1)


@dataclass
class Behaviour:
    """What each (site, round) does; keys are (site, round) with round None meaning every round."""

    fail: set[tuple[str, int | None]] = field(default_factory=set)
    delay: dict[tuple[str, int | None], float] = field(default_factory=dict)
    duplicate: set[tuple[str, int | None]] = field(default_factory=set)
    #: deliver only once the aggregator has closed the round (its next global model exists): a late update
    #: by construction, whatever the load on the machine, instead of a race between a sleep and a deadline
    after_close: set[tuple[str, int | None]] = field(default_factory=set)
    #: a site that ignores the task's dp_clip_norm (an old or misbehaving worker): the aggregator must clip
    ignore_clip: set[tuple[str, int | None]] = field(default_factory=set)
    #: deliver exactly these weights instead of global + delta (a model of known quality)
    weights: dict[tuple[str, int | None], dict[str, np.ndarray]] = field(default_factory=dict)
    calls: list[tuple[str, int, str]] = field(default_factory=list)
    tasks: list[dict[str, Any]] = field(default_factory=list)  # every TrainingRoundTask as received
    #: the site waits for this event before it trains (a test holds a round open while it watches the run)
    hold: dict[tuple[str, int | None], threading.Event] = field(default_factory=dict)

    def _get(self, table: Any, site: str, round_index: int) -> Any:
        for key in ((site, round_index), (site, None)):
            if key in table:
                return table[key] if isinstance(table, dict) else True
        return None

    def reset(self) -> None:
        self.fail.clear()
        self.delay.clear()
        self.duplicate.clear()
        self.after_close.clear()
        self.ignore_clip.clear()
        self.weights.clear()
        self.hold.clear()
        self.calls.clear()
        self.tasks.clear()


#: what the sites do for the run a test is about to start (tests run one at a time)
CURRENT = Behaviour()


def write_update(
    store: Any,
    task: dict[str, Any],
    attempt: str,
    finished_at: dt.datetime | None = None,
    clip: bool = True,
    weights_given: dict[str, np.ndarray] | None = None,
) -> str:
    run_id, round_index, site = task["run_id"], int(task["round"]), task["site"]
    global_state = fs.load_weights(store, task["global_weights_uri"])
    delta = site_delta(site, round_index)
    local = weights_given or {
        k: (v + np.asarray(delta, dtype=v.dtype)) if np.issubdtype(v.dtype, np.floating) else v + 1
        for k, v in global_state.items()
    }
    clip_norm = float(task.get("dp_clip_norm") or 0.0) if clip else 0.0
    if clip_norm > 0:  # as the real training worker does: the update leaves the site clipped
        local, _ = clip_update(global_state, local, clip_norm)
    weights = fs.weights_key(run_id, round_index, site, attempt)
    fs.save_weights(store, weights, local)
    update = training_pb2.ModelUpdate(
        run_id=run_id,
        round=round_index,
        site=site,
        task_attempt_id=attempt,
        weights_uri=weights,
        num_samples=NUM_SAMPLES[site],
        metrics={"train_loss": 1.0 / (round_index + 1), "val_dice": 0.5 + 0.1 * round_index},
        finished_at=(finished_at or dt.datetime.now(dt.UTC)).isoformat(),
        clip_norm=clip_norm,
    )
    key = fs.update_key(run_id, round_index, site, attempt)
    store.put_bytes(key, messages.to_json_bytes(update), content_type="application/json")
    return key


def make_app(broker_url: str, database_url: str, storage_url: str) -> Celery:
    app = create_celery_app("fake-training", broker_url, database_url)
    store = open_object_store(storage_url)
    progress = ProgressPublisher(broker_url)

    @app.task(name="training.train_round", bind=True, max_retries=0)
    def train_round(self: Any, task: dict[str, Any]) -> str:
        run_id, round_index, site = task["run_id"], int(task["round"]), task["site"]
        attempt = task["task_attempt_id"]
        behaviour = CURRENT
        behaviour.calls.append((site, round_index, attempt))
        behaviour.tasks.append(dict(task))
        if behaviour._get(behaviour.fail, site, round_index):
            raise PermanentTaskError(f"{site}: simulated out-of-memory in round {round_index}")
        if store.exists(fs.update_key(run_id, round_index, site, attempt)):
            return "already delivered"  # idempotent: the attempt id was seen before
        delay = behaviour._get(behaviour.delay, site, round_index)
        if delay:
            time.sleep(delay)
        if behaviour._get(behaviour.after_close, site, round_index):
            next_global = fs.global_key(run_id, round_index + 1)
            deadline = time.monotonic() + 120
            while not store.exists(next_global) and time.monotonic() < deadline:
                time.sleep(0.2)
        hold = behaviour._get(behaviour.hold, site, round_index)
        if hold is not None and not hold.wait(timeout=120):
            raise PermanentTaskError(f"{site}: round {round_index} was held for 120 s and never released")
        epochs = int(task.get("local_epochs") or 1)
        for epoch in range(1, epochs + 1):  # the per-epoch events the real worker publishes, with made-up values
            progress.publish(
                RunEvent(
                    kind="epoch",
                    run_id=run_id,
                    round=round_index,
                    site=site,
                    epoch=epoch,
                    epochs=epochs,
                    loss=1.0 / (round_index * epochs + epoch),
                    val_dice=0.5 + 0.1 * round_index,
                    seconds=0.5 + SITE_FACTOR[site],
                )
            )
        started = time.monotonic()
        write_update(
            store,
            task,
            attempt,
            clip=not behaviour._get(behaviour.ignore_clip, site, round_index),
            weights_given=behaviour._get(behaviour.weights, site, round_index),
        )
        log.warning("fake site %s round %d delivered (%.2f s to write)", site, round_index, time.monotonic() - started)
        if behaviour._get(behaviour.duplicate, site, round_index):
            # a second delivery under another attempt id, and a rewrite of the accepted one (other etag),
            # a moment after the first so that the aggregator has accepted that one
            time.sleep(1.0)
            write_update(store, task, attempt + "-retry")
            write_update(store, task, attempt, finished_at=dt.datetime.now(dt.UTC) + dt.timedelta(microseconds=1))
        return "delivered"

    return app
