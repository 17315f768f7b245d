"""Persisted state of federated runs: what was asked, what was dispatched, what came back, what was made of it.

Everything the aggregator needs to resume a run after a crash lives here (plus the weights in object
storage), so an aggregator killed between or inside rounds continues at the last completed round and
produces the same weights.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from shared.db.base import Base, utcnow

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version_aggregation"

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


class FederatedRun(Base):
    """One federated training run. status: pending → running → succeeded | failed | cancelled."""

    __tablename__ = "federated_runs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    dataset_version: Mapped[str] = mapped_column(String(64))
    sites: Mapped[list[str]] = mapped_column(JSON)
    rounds: Mapped[int] = mapped_column(Integer)
    local_epochs: Mapped[int] = mapped_column(Integer)
    strategy: Mapped[str] = mapped_column(String(16))
    fedprox_mu: Mapped[float] = mapped_column(Float, default=0.0)
    server_optimizer: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    min_sites: Mapped[int] = mapped_column(Integer)
    round_timeout_seconds: Mapped[float] = mapped_column(Float)
    privacy: Mapped[dict[str, float] | None] = mapped_column(JSON, default=None)
    training_config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    initial_weights_key: Mapped[str | None] = mapped_column(String(1024), default=None)
    evaluate: Mapped[bool] = mapped_column(Boolean, default=True)
    seed: Mapped[int] = mapped_column(Integer, default=0)
    #: the round being collected; equals ``rounds`` once every round is aggregated
    current_round: Mapped[int] = mapped_column(Integer, default=0)
    epsilon: Mapped[float | None] = mapped_column(Float, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_by: Mapped[str | None] = mapped_column(String(200), default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), default=None)
    model_name: Mapped[str | None] = mapped_column(String(200), default=None)
    model_version: Mapped[str | None] = mapped_column(String(32), default=None)
    #: the one advance_run message that owns the polling chain (others are stale redeliveries and stop)
    poll_task_id: Mapped[str | None] = mapped_column(String(64), default=None)
    #: sites carry their optimiser state from round to round (site-private; never sent here)
    keep_optimizer_state: Mapped[bool] = mapped_column(Boolean, default=True)
    #: FedBN: normalisation layers stay at the sites; the global model holds their plain mean
    local_norm_layers: Mapped[bool] = mapped_column(Boolean, default=False)
    #: {"patience": rounds, "min_delta": x} on the global validation Dice; None = run every round
    early_stopping: Mapped[dict[str, float] | None] = mapped_column(JSON, default=None)
    stopped_early: Mapped[bool] = mapped_column(Boolean, default=False)
    #: the round whose aggregated model has the best global validation Dice so far (the one registered)
    best_round: Mapped[int | None] = mapped_column(Integer, default=None)
    #: the chosen model on holdout.test: {"pooled": {...}, "sites": {site: {...}}} (see evaluation.summarise_test)
    test_metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    #: the training_config fields taken from the dataset version's plan when the run was created
    plan_fields: Mapped[list[str]] = mapped_column(JSON, default=list)


def chosen_round(run: FederatedRun) -> int:
    """The round whose aggregated model the run delivers (``global_key(run, r + 1)``): the best by global
    validation Dice, else the last one aggregated."""
    return run.best_round if run.best_round is not None else max(run.current_round - 1, 0)


class FederatedRound(Base):
    """One round of a run. status: collecting → aggregated | failed."""

    __tablename__ = "federated_rounds"
    __table_args__ = (UniqueConstraint("run_id", "round"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("federated_runs.id", ondelete="CASCADE"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="collecting")
    dispatched: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    deadline: Mapped[dt.datetime]
    closed_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    num_updates: Mapped[int] = mapped_column(Integer, default=0)
    total_samples: Mapped[int] = mapped_column(Integer, default=0)
    #: global-model metrics after aggregation: {"sites": {site: {metric: value}}, "mean": {metric: value}}
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    noise_std: Mapped[float | None] = mapped_column(Float, default=None)
    epsilon: Mapped[float | None] = mapped_column(Float, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)


class RoundSite(Base):
    """What one site was asked to do in one round. state: dispatched → delivered | failed | missing."""

    __tablename__ = "federated_round_sites"
    __table_args__ = (UniqueConstraint("run_id", "round", "site"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("federated_runs.id", ondelete="CASCADE"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    site: Mapped[str] = mapped_column(String(64))
    attempt_id: Mapped[str] = mapped_column(String(160), unique=True)
    state: Mapped[str] = mapped_column(String(16), default="dispatched")
    num_samples: Mapped[int | None] = mapped_column(Integer, default=None)
    #: the site's own metrics from its update (train_loss, val_dice, ...)
    metrics: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    update_norm: Mapped[float | None] = mapped_column(Float, default=None)
    weights_key: Mapped[str | None] = mapped_column(String(1024), default=None)
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class SiteUpdate(Base):
    """Every update.json seen in object storage, accepted or discarded (late, duplicate, unknown attempt,
    invalid), with the reason. A rewritten object (other etag) is a new row."""

    __tablename__ = "federated_site_updates"
    __table_args__ = (UniqueConstraint("run_id", "key", "etag"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("federated_runs.id", ondelete="CASCADE"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    site: Mapped[str] = mapped_column(String(64))
    attempt_id: Mapped[str] = mapped_column(String(160))
    key: Mapped[str] = mapped_column(String(1024))
    etag: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(24))  # accepted | discarded
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    num_samples: Mapped[int | None] = mapped_column(Integer, default=None)
    seen_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
