"""Live progress of a federated run: one Redis stream per run that the site workers and the aggregator append
to and the aggregation API replays and follows (``GET /federated-runs/{id}/events``, docs/federated.md).

Why a Redis stream and not pub/sub or the Celery task state: a stream keeps what was written (a client that
connects late, or reconnects with ``Last-Event-ID``, replays it), its entry ids are ordered and make natural SSE
event ids, and Redis is already the broker every worker reaches. The Celery ``PROGRESS`` state of a round task
only holds the latest epoch and is keyed by an attempt id the API does not follow.

Publishing is best effort: progress must never fail a training round or an aggregation, so a Redis error is
logged and the event is dropped (the durable record of a run stays PostgreSQL, object storage and MLflow).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict

log = logging.getLogger("voxelflow.progress")

STREAM_PREFIX = "voxelflow:run-events:"
#: entries kept per run (approximate trim): a 1000-round, 10-site, 10-epoch run stays replayable
STREAM_MAXLEN = 200_000
#: a finished run's stream is dropped this long after its last event
STREAM_TTL_SECONDS = 30 * 24 * 3600

EventKind = Literal["epoch", "round_started", "round_aggregated", "run_finished"]


def stream_key(run_id: str) -> str:
    """The Redis stream of run ``run_id``'s events."""
    return f"{STREAM_PREFIX}{run_id}"


class RunEvent(BaseModel):
    """One progress event; which fields are set depends on ``kind``:

    - ``epoch`` (a site worker, after each local epoch): round, site, epoch (1-based), epochs, loss, val_dice,
      seconds (the epoch's duration);
    - ``round_started`` (aggregator): round, sites;
    - ``round_aggregated`` (aggregator): round, participants, val_dice (the global val Dice, pooled over the
      sites' holdout.val; None without evaluation), epsilon (ε so far; None without privacy);
    - ``run_finished`` (aggregator or API): status (succeeded / failed / cancelled), error.
    """

    model_config = ConfigDict(extra="ignore")  # a newer writer's extra field does not break an older reader
    kind: EventKind
    run_id: str
    round: int | None = None
    site: str | None = None
    epoch: int | None = None
    epochs: int | None = None
    loss: float | None = None
    val_dice: float | None = None
    seconds: float | None = None
    sites: list[str] | None = None
    participants: int | None = None
    epsilon: float | None = None
    status: str | None = None
    error: str | None = None


def encode(event: RunEvent) -> dict[str, str]:
    """The fields of the stream entry (one JSON field: the entry stays readable by any client)."""
    return {"event": event.model_dump_json(exclude_none=True)}


def decode(fields: dict[Any, Any]) -> RunEvent:
    raw = fields.get(b"event", fields.get("event"))
    if isinstance(raw, bytes):
        raw = raw.decode()
    if not isinstance(raw, str):
        raise ValueError("stream entry has no 'event' field")
    return RunEvent.model_validate(json.loads(raw))


class ProgressPublisher:
    """Appends events to their run's stream on the Redis at ``redis_url`` (the broker)."""

    def __init__(self, redis_url: str) -> None:
        import redis

        self._redis = redis.Redis.from_url(redis_url, socket_timeout=5)

    def publish(self, event: RunEvent) -> str | None:
        """The entry id, or None when Redis could not be reached (logged, never raised)."""
        import redis

        key = stream_key(event.run_id)
        try:
            with self._redis.pipeline() as pipe:
                pipe.xadd(key, cast(Any, encode(event)), maxlen=STREAM_MAXLEN, approximate=True)
                pipe.expire(key, STREAM_TTL_SECONDS)
                entry_id, _ = pipe.execute()
        except redis.RedisError as exc:
            log.warning("progress event %s of run %s not published: %s", event.kind, event.run_id, exc)
            return None
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def eta_seconds(epoch_seconds: Sequence[float], epochs_left: int) -> float | None:
    """Seconds left for ``epochs_left`` more epochs at the mean duration of the last (up to 5) epochs; None
    before the first epoch. The recent mean follows a site that speeds up (warm caches) or slows down."""
    recent = [s for s in epoch_seconds[-5:] if math.isfinite(s) and s >= 0]
    if not recent:
        return None
    return max(epochs_left, 0) * sum(recent) / len(recent)


def site_epochs_left(rounds: int, epochs_per_round: int, round_index: int, epoch: int) -> int:
    """Local epochs a site still trains after epoch ``epoch`` (1-based) of round ``round_index`` (0-based),
    if it takes part in every remaining round."""
    return max(epochs_per_round - epoch, 0) + max(rounds - round_index - 1, 0) * epochs_per_round
