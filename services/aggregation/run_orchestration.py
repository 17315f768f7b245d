"""The federated run as a state machine, advanced by the idempotent task ``aggregation.advance_run``.

One call does as much as it can and then either finishes the run or schedules the next poll:

    pending ──start──▶ running: round r ──dispatch──▶ collecting ──(all in | deadline with quorum)──▶
        aggregate → global of round r+1 → evaluate → log ──▶ round r+1 … ──▶ succeeded
    collecting ──(deadline without quorum | quorum impossible)──▶ failed

Crash safety: every state change is committed before the side effect that depends on it and every side
effect can be repeated (round tasks are sent with their attempt id as Celery task id and the training
worker treats that id as its idempotency key; weights written for round r+1 are a pure function of the
recorded accepted updates; MLflow metrics are re-logged at the same step). A run is only ever advanced
by one process at a time (a PostgreSQL advisory lock), and only the one ``advance_run`` message recorded
as the run's ``poll_task_id`` keeps polling, so redelivered messages of a killed worker stop at once.
A worker that starts takes over every running run (``force``), which is how a killed aggregator resumes.

Late updates are judged by the round's deadline against the update's ``finished_at`` as well as by
whether the round was already closed when the aggregator saw it, so the outcome does not depend on how
long the aggregator was down.

What the run keeps and chooses follows the global validation Dice (``val_dice_mean``, the global model pooled
over every site's ``holdout.val``): the round with the best one is the run's ``best_round`` and its model is
the one scored on ``holdout.test`` and registered; with ``early_stopping`` the run ends once that many rounds
in a row have not improved it. Without evaluation the last round is the chosen one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from services.aggregation import federated_storage as fs
from services.aggregation import metrics as agg_metrics
from services.aggregation.context import AggregationContext
from services.aggregation.model_setup import local_norm_keys
from services.aggregation.models import (
    TERMINAL_STATUSES,
    FederatedRound,
    FederatedRun,
    RoundSite,
    SiteUpdate,
    chosen_round,
)
from services.aggregation.privacy import PrivacyConfig, epsilon_after, privatise
from services.aggregation.strategies import (
    ServerOptimizerConfig,
    Strategy,
    check_compatible,
    fedavg,
    server_update,
)
from services.aggregation.tracking import RunTracker, make_tracker
from shared.contracts import artifacts, messages
from shared.contracts.progress import RunEvent
from shared.contracts.tasks import TRAIN_ROUND_TASK
from shared.db.base import session_scope, utcnow
from shared.privacy import update_norm
from shared.proto.voxelflow.v1 import training_pb2
from shared.tasks import PermanentTaskError

log = logging.getLogger("voxelflow.aggregation")


# ------------------------------------------------------------------------------------------ pure decisions


def decide_round(
    delivered: int, failed: int, total: int, min_sites: int, now: dt.datetime, deadline: dt.datetime
) -> str:
    """'aggregate', 'fail' or 'wait' for a collecting round."""
    if delivered == total:
        return "aggregate"
    if delivered + failed >= total or now >= deadline:
        return "aggregate" if delivered >= min_sites else "fail"
    if total - failed < min_sites:
        return "fail"  # too many sites failed for a quorum to be possible
    return "wait"


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: str | None = None


def classify_update(
    *,
    round_index: int,
    site: str,
    attempt: str,
    current_round: int,
    round_closed: bool,
    run_sites: list[str],
    dispatched_attempt: str | None,
    site_already_delivered: bool,
    deadline: dt.datetime | None,
    finished_at: dt.datetime | None,
) -> Verdict:
    """Whether an update.json is the accepted update of its (round, site), and if not, why not."""
    if site not in run_sites:
        return Verdict(False, f"unknown_site: {site!r} is not a site of this run")
    if round_index > current_round or dispatched_attempt is None:
        return Verdict(False, f"invalid: round {round_index} was never dispatched to {site}")
    if round_closed:
        return Verdict(False, f"late: round {round_index} was already aggregated when the update arrived")
    if site_already_delivered:
        return Verdict(False, f"duplicate: round {round_index} already has an accepted update from {site}")
    if attempt != dispatched_attempt:
        return Verdict(False, f"unknown_attempt: {attempt!r} is not the dispatched attempt {dispatched_attempt!r}")
    if deadline is not None and finished_at is not None and finished_at > deadline:
        return Verdict(False, f"late: finished at {finished_at.isoformat()}, after the deadline {deadline.isoformat()}")
    return Verdict(True)


def choose_round(val_dice: Sequence[float | None]) -> int | None:
    """Index of the round whose aggregated model scored the highest global validation Dice (the earliest on
    a tie: fewer rounds for the same score); None when no round was scored."""
    scored = [(value, -index) for index, value in enumerate(val_dice) if value is not None]
    return -max(scored)[1] if scored else None


def should_stop(val_dice: Sequence[float | None], patience: int, min_delta: float = 0.0) -> bool:
    """True once the last ``patience`` scored rounds have not raised the best global validation Dice by more
    than ``min_delta`` (the same rule as a site's local early stopping, per round instead of per epoch)."""
    best: float | None = None
    without_gain = 0
    for value in val_dice:
        if value is None:
            continue
        if best is None or value > best + min_delta:
            best, without_gain = value, 0
        else:
            without_gain += 1
    return without_gain >= patience


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


# ------------------------------------------------------------------------------------------ orchestration


@dataclass
class AdvanceOutcome:
    status: str  # the run's status, or 'busy' / 'superseded' when this message did nothing
    current_round: int | None = None
    next_poll_task_id: str | None = None


@contextlib.contextmanager
def run_lock(ctx: AggregationContext, run_id: str) -> Iterator[bool]:
    """A session-level PostgreSQL advisory lock on the run (released when the process dies); SQLite: no-op."""
    if ctx.engine.dialect.name != "postgresql":
        yield True
        return
    key = int.from_bytes(hashlib.sha256(f"federated-run:{run_id}".encode()).digest()[:8], "big", signed=True)
    with ctx.engine.connect() as connection:
        acquired = bool(connection.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
        connection.commit()
        try:
            yield acquired
        finally:
            if acquired:
                connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                connection.commit()


class RunOrchestrator:
    """Thin: reads and writes state, calls the pure functions above and in strategies/privacy."""

    def __init__(self, ctx: AggregationContext, tracker: RunTracker | None = None) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.tracker = tracker or make_tracker(
            ctx.settings.mlflow_tracking_uri, ctx.settings.mlflow_experiment, ctx.settings.registered_model_name
        )

    # -- entry point -------------------------------------------------------------------------------------

    def advance(self, run_id: str, task_id: str, force: bool = False) -> AdvanceOutcome:
        """Advance the run as far as possible; while a round collects, poll for up to the task budget, then
        hand over to a fresh message (so one run never monopolises a worker and a redelivery stays cheap)."""
        if not force and (early := self._not_mine(run_id, task_id)) is not None:
            return early  # checked before locking: stale messages never contend for the lock
        with run_lock(self.ctx, run_id) as acquired:
            if not acquired:
                return AdvanceOutcome("busy")  # the process holding the run keeps its chain going
            with session_scope(self.ctx.session_factory) as session:
                run = self._run(session, run_id)
                if run.status in TERMINAL_STATUSES:
                    return AdvanceOutcome(run.status, run.current_round)
                if not force and run.poll_task_id not in (None, task_id):
                    return AdvanceOutcome("superseded", run.current_round)
                run.poll_task_id = task_id
            started = time.monotonic()
            try:
                while True:
                    outcome = self._advance(run_id)
                    if outcome.status != "waiting":
                        if outcome.status in TERMINAL_STATUSES:
                            self._publish_finished(run_id)
                        return outcome
                    if time.monotonic() - started >= self.ctx.settings.poll_task_budget_seconds:
                        break
                    time.sleep(self.ctx.settings.poll_interval_seconds)
            except PermanentTaskError as exc:
                self._fail(run_id, str(exc))
                self._publish_finished(run_id)
                raise
            next_task_id = uuid.uuid4().hex
            with session_scope(self.ctx.session_factory) as session:
                self._run(session, run_id).poll_task_id = next_task_id
            try:
                self.ctx.kick(run_id, task_id=next_task_id)
            except Exception as exc:
                # the hand-over message never left (broker down): stay the run's poller, or every message
                # would be "superseded" by one that does not exist and the run would stall; the retry of
                # this task (same id) goes on from here
                with session_scope(self.ctx.session_factory) as session:
                    run = self._run(session, run_id)
                    if run.poll_task_id == next_task_id:
                        run.poll_task_id = task_id
                raise ConnectionError(f"run {run_id}: could not hand polling over: {exc}") from exc
        return AdvanceOutcome("running", outcome.current_round, next_task_id)

    def _publish_finished(self, run_id: str) -> None:
        """The run's last event (a resumed or redelivered advance may send it twice; readers stop at the first)."""
        with self.ctx.session_factory() as session:
            run = self._run(session, run_id)
            event = RunEvent(
                kind="run_finished", run_id=run_id, round=run.current_round, status=run.status, error=run.error
            )
        self.ctx.progress.publish(event)

    def _not_mine(self, run_id: str, task_id: str) -> AdvanceOutcome | None:
        with self.ctx.session_factory() as session:
            run = self._run(session, run_id)
            if run.status in TERMINAL_STATUSES:
                return AdvanceOutcome(run.status, run.current_round)
            if run.poll_task_id not in (None, task_id):
                return AdvanceOutcome("superseded", run.current_round)
        return None

    def _advance(self, run_id: str) -> AdvanceOutcome:
        while True:
            with session_scope(self.ctx.session_factory) as session:
                run = self._run(session, run_id)
                if run.status in TERMINAL_STATUSES:
                    return AdvanceOutcome(run.status, run.current_round)
                if run.status == "pending":
                    self._start(session, run)
                    continue
                if run.current_round >= run.rounds or run.stopped_early:
                    self._finish(session, run)
                    return AdvanceOutcome(run.status, run.current_round)
                rnd = self._round(session, run.id, run.current_round)
                if rnd is None:
                    self._open_round(session, run)
                    continue
            if not rnd.dispatched:
                self._dispatch(run_id, rnd.round)
            decision = self._collect(run_id)
            if decision == "wait":
                return AdvanceOutcome("waiting", rnd.round)
            if decision == "fail":
                return AdvanceOutcome("failed", rnd.round)
            self._aggregate(run_id)

    # -- steps -------------------------------------------------------------------------------------------

    @staticmethod
    def _run(session: Session, run_id: str) -> FederatedRun:
        run = session.get(FederatedRun, run_id)
        if run is None:
            raise PermanentTaskError(f"no federated run {run_id}")
        return run

    @staticmethod
    def _round(session: Session, run_id: str, round_index: int) -> FederatedRound | None:
        return session.scalar(
            select(FederatedRound).where(FederatedRound.run_id == run_id, FederatedRound.round == round_index)
        )

    def _start(self, session: Session, run: FederatedRun) -> None:
        """Write the training config and round 0's weights, open the MLflow run, mark the run running."""
        from services.aggregation.model_setup import initial_weights

        self.store.put_bytes(
            fs.config_key(run.id),
            yaml.safe_dump(run.training_config, sort_keys=False).encode(),
            content_type="application/yaml",
        )
        if not self.store.exists(fs.global_key(run.id, 0)):
            fs.save_weights(self.store, fs.global_key(run.id, 0), initial_weights(self.store, run))
        params = {
            "dataset_version": run.dataset_version,
            "sites": ",".join(run.sites),
            "rounds": run.rounds,
            "local_epochs": run.local_epochs,
            "strategy": run.strategy,
            "fedprox_mu": run.fedprox_mu,
            "min_sites": run.min_sites,
            "round_timeout_seconds": run.round_timeout_seconds,
            "seed": run.seed,
            "privacy": json.dumps(run.privacy) if run.privacy else "off",
            "training_config": json.dumps(run.training_config, sort_keys=True),
            "plan_fields": ",".join(run.plan_fields or []) or "none",
            "keep_optimizer_state": run.keep_optimizer_state,
            "local_norm_layers": run.local_norm_layers,
            "early_stopping": json.dumps(run.early_stopping) if run.early_stopping else "off",
            **{f"server_{k}": v for k, v in sorted(run.server_optimizer.items())},
        }
        tags = {
            "dataset_version": run.dataset_version,
            "preprocessing_hash": self._preprocessing_hash(run),
            "git_sha": self.ctx.git_sha,
            "strategy": run.strategy,
        }
        run.mlflow_run_id = run.mlflow_run_id or self.tracker.start(run, params, tags)
        run.status = "running"
        agg_metrics.runs_total.labels("started").inc()

    def _preprocessing_hash(self, run: FederatedRun) -> str:
        try:
            manifest = json.loads(self.store.get_bytes(f"datasets/{run.dataset_version}/manifest.json"))
            return str(manifest.get("preprocessing_hash", "unknown"))
        except (KeyError, ValueError):
            return "unknown"

    def _open_round(self, session: Session, run: FederatedRun) -> None:
        r = run.current_round
        now = utcnow()
        session.add(
            FederatedRound(
                run_id=run.id,
                round=r,
                started_at=now,
                deadline=now + dt.timedelta(seconds=run.round_timeout_seconds),
            )
        )
        for site in run.sites:
            session.add(RoundSite(run_id=run.id, round=r, site=site, attempt_id=fs.attempt_id(run.id, r, site)))

    def _dispatch(self, run_id: str, round_index: int) -> None:
        """Send the round task to every site's queue (repeatable: the attempt id is the Celery task id)."""
        with session_scope(self.ctx.session_factory) as session:
            run = self._run(session, run_id)
            sites = list(
                session.scalars(select(RoundSite).where(RoundSite.run_id == run_id, RoundSite.round == round_index))
            )
            # before the tasks leave, so that it precedes their epoch events (a re-dispatch after a crash repeats it)
            started = RunEvent(
                kind="round_started", run_id=run_id, round=round_index, sites=sorted(s.site for s in sites)
            )
            self.ctx.progress.publish(started)
            for rs in sites:
                task = training_pb2.TrainingRoundTask(
                    run_id=run.id,
                    round=round_index,
                    site=rs.site,
                    dataset_version_id=run.dataset_version,
                    global_weights_uri=fs.global_key(run.id, round_index),
                    training_config_uri=fs.config_key(run.id),
                    local_epochs=run.local_epochs,
                    fedprox_mu=run.fedprox_mu if run.strategy == Strategy.FEDPROX else 0.0,
                    task_attempt_id=rs.attempt_id,
                    dp_clip_norm=float(run.privacy["clip_norm"]) if run.privacy else 0.0,
                    # the schedule spans the run: round r starts at global epoch r*E of R*E
                    schedule_offset=round_index * run.local_epochs,
                    schedule_total=run.rounds * run.local_epochs,
                    keep_optimizer_state=run.keep_optimizer_state,
                    local_norm_layers=run.local_norm_layers,
                )
                payload = messages.to_dict(task)
                self.ctx.celery.send_task(
                    TRAIN_ROUND_TASK, args=[payload], queue=self.ctx.training_queue(rs.site), task_id=rs.attempt_id
                )
            rnd = self._round(session, run_id, round_index)
            assert rnd is not None
            rnd.dispatched = True
        agg_metrics.rounds_dispatched_total.inc()

    def _collect(self, run_id: str) -> str:
        """Record every new update.json and failed site task; close the round when it is decided."""
        with session_scope(self.ctx.session_factory) as session:
            run = self._run(session, run_id)
            r = run.current_round
            rnd = self._round(session, run_id, r)
            assert rnd is not None
            sites = {
                rs.site: rs
                for rs in session.scalars(select(RoundSite).where(RoundSite.run_id == run_id, RoundSite.round == r))
            }
            seen = {(u.key, u.etag) for u in session.scalars(select(SiteUpdate).where(SiteUpdate.run_id == run_id))}
            global_state: dict[str, Any] | None = None
            for key in self.store.list(fs.run_prefix(run_id)):
                parsed = fs.parse_update_key(run_id, key)
                if parsed is None:
                    continue
                try:
                    info = self.store.stat(key)
                except KeyError:
                    continue
                if (key, info.etag) in seen:
                    continue
                round_index, site, attempt = parsed
                if global_state is None and round_index == r:
                    global_state = fs.load_weights(self.store, fs.global_key(run_id, r))
                self._record_update(session, run, rnd, sites, key, info.etag, round_index, site, attempt, global_state)
            self._check_failed_sites(sites)
            delivered = sum(1 for rs in sites.values() if rs.state == "delivered")
            failed = sum(1 for rs in sites.values() if rs.state == "failed")
            decision = decide_round(delivered, failed, len(sites), run.min_sites, utcnow(), _aware(rnd.deadline))
            if decision == "wait":
                return decision
            for rs in sites.values():
                if rs.state == "dispatched":
                    rs.state, rs.reason = "missing", "no update before the round was closed"
                    agg_metrics.site_outcomes_total.labels("missing").inc()
            if decision == "fail":
                missing = sorted(s for s, rs in sites.items() if rs.state == "missing")
                failed_sites = sorted(s for s, rs in sites.items() if rs.state == "failed")
                reason = (
                    f"round {r}: {delivered} of {len(sites)} sites delivered, the quorum is {run.min_sites} "
                    f"(missing: {', '.join(missing) or 'none'}; failed: {', '.join(failed_sites) or 'none'})"
                )
                rnd.status, rnd.error, rnd.closed_at = "failed", reason, utcnow()
                self._mark_failed(run, reason)
                agg_metrics.rounds_failed_total.inc()
            return decision

    def _record_update(
        self,
        session: Session,
        run: FederatedRun,
        rnd: FederatedRound,
        sites: dict[str, RoundSite],
        key: str,
        etag: str,
        round_index: int,
        site: str,
        attempt: str,
        global_state: dict[str, Any] | None,
    ) -> None:
        message, finished_at, problem = self._parse_update(run.id, key, round_index, site, attempt)
        rs = sites.get(site) if round_index == run.current_round else None
        dispatched: str | None
        if round_index < run.current_round:
            dispatched = fs.attempt_id(run.id, round_index, site)
        else:
            dispatched = rs.attempt_id if rs is not None else None
        verdict = (
            Verdict(False, problem)
            if problem
            else classify_update(
                round_index=round_index,
                site=site,
                attempt=attempt,
                current_round=run.current_round,
                round_closed=round_index < run.current_round,
                run_sites=run.sites,
                dispatched_attempt=dispatched,
                site_already_delivered=rs is not None and rs.state == "delivered",
                deadline=_aware(rnd.deadline) if round_index == run.current_round else None,
                finished_at=finished_at,
            )
        )
        weights_key = message.weights_uri if message is not None else None
        if verdict.accepted and message is not None and global_state is not None:
            try:
                update = fs.load_weights(self.store, message.weights_uri)
                check_compatible(global_state, [update])
            except (KeyError, ValueError) as exc:
                verdict = Verdict(False, f"invalid: weights {message.weights_uri}: {exc}")
            else:
                assert rs is not None
                rs.state, rs.reason = "delivered", None
                rs.num_samples = int(message.num_samples)
                rs.metrics = dict(message.metrics)
                rs.weights_key = weights_key
                rs.update_norm = update_norm(global_state, update)
                if run.privacy and rs.update_norm > float(run.privacy["clip_norm"]) * (1 + 1e-4):
                    # the aggregator clips it anyway (privatise), so ε holds; the site should be looked at
                    log.warning(
                        "run %s: %s sent a round-%d update of norm %.4g above the clip bound %.4g (clipped on receipt)",
                        run.id,
                        site,
                        round_index,
                        rs.update_norm,
                        run.privacy["clip_norm"],
                    )
                rs.delivered_at = utcnow()
        status = "accepted" if verdict.accepted else "discarded"
        session.add(
            SiteUpdate(
                run_id=run.id,
                round=round_index,
                site=site,
                attempt_id=attempt,
                key=key,
                etag=etag,
                status=status,
                reason=verdict.reason,
                num_samples=int(message.num_samples) if message is not None else None,
            )
        )
        outcome = "accepted" if verdict.accepted else (verdict.reason or "invalid").split(":", 1)[0]
        agg_metrics.updates_total.labels(outcome).inc()
        if not verdict.accepted:
            log.warning("run %s: discarded %s: %s", run.id, key, verdict.reason)

    def _parse_update(
        self, run_id: str, key: str, round_index: int, site: str, attempt: str
    ) -> tuple[training_pb2.ModelUpdate | None, dt.datetime | None, str | None]:
        """The ModelUpdate in update.json, checked against its path; (None, None, reason) when invalid."""
        try:
            message = messages.from_json_bytes(self.store.get_bytes(key), training_pb2.ModelUpdate)
        except (messages.MessageError, KeyError) as exc:
            return None, None, f"invalid: update.json is not a ModelUpdate: {exc}"
        expected = (run_id, round_index, site, attempt)
        got = (message.run_id, message.round, message.site, message.task_attempt_id)
        if got != expected:
            return None, None, f"invalid: update.json says {got}, its path says {expected}"
        if message.num_samples <= 0:
            return None, None, f"invalid: num_samples must be positive, got {message.num_samples}"
        if not message.weights_uri.startswith(fs.round_prefix(run_id, round_index)):
            return None, None, f"invalid: weights_uri {message.weights_uri!r} is outside the run's round folder"
        finished_at = None
        if message.finished_at:
            try:
                finished_at = _aware(dt.datetime.fromisoformat(message.finished_at.replace("Z", "+00:00")))
            except ValueError:
                return None, None, f"invalid: finished_at {message.finished_at!r} is not RFC 3339"
        return message, finished_at, None

    def _check_failed_sites(self, sites: dict[str, RoundSite]) -> None:
        """A site task that ended in FAILURE (retries exhausted or a permanent error) is reported, not waited for."""
        for rs in sites.values():
            if rs.state != "dispatched":
                continue
            result = self.ctx.celery.AsyncResult(rs.attempt_id)
            if result.state == "FAILURE":
                rs.state = "failed"
                rs.reason = f"site task failed: {type(result.result).__name__}: {result.result}"[:2000]
                agg_metrics.site_outcomes_total.labels("failed").inc()

    def _aggregate(self, run_id: str) -> None:
        with session_scope(self.ctx.session_factory) as session:
            run = self._run(session, run_id)
            r = run.current_round
            rnd = self._round(session, run_id, r)
            assert rnd is not None
            delivered = sorted(
                session.scalars(
                    select(RoundSite).where(
                        RoundSite.run_id == run_id, RoundSite.round == r, RoundSite.state == "delivered"
                    )
                ),
                key=lambda rs: rs.site,
            )
            global_state = fs.load_weights(self.store, fs.global_key(run_id, r))
            updates = [fs.load_weights(self.store, rs.weights_key or "") for rs in delivered]
            counts = [int(rs.num_samples or 0) for rs in delivered]
            strategy = Strategy(run.strategy)
            if run.privacy:
                privacy = PrivacyConfig(**run.privacy)
                averaged, _, rnd.noise_std = privatise(global_state, updates, counts, privacy)
                rnd.epsilon = run.epsilon = epsilon_after(r + 1, privacy.noise_multiplier, privacy.delta)
            else:
                averaged = fedavg(global_state, updates, counts)
            server_state = None
            if strategy in (Strategy.FEDADAM, Strategy.FEDYOGI) and r > 0:
                server_state = fs.load_server_state(self.store, fs.server_state_key(run_id, r))
            local_keys = local_norm_keys(run)
            if not local_keys <= set(global_state):
                raise PermanentTaskError(
                    f"local_norm_layers: the global weights lack normalisation entries of the configured network "
                    f"(e.g. {sorted(local_keys - set(global_state))[:3]})"
                )
            new_global, new_state = server_update(
                strategy,
                global_state,
                averaged,
                server_state,
                ServerOptimizerConfig(**run.server_optimizer),
                local_keys,
            )
            fs.save_weights(self.store, fs.global_key(run_id, r + 1), new_global)
            if new_state is not None:
                fs.save_server_state(self.store, fs.server_state_key(run_id, r + 1), new_state)
            evaluation = self._evaluate(run, new_global)
            rnd.metrics = evaluation
            rnd.num_updates = len(delivered)
            rnd.total_samples = sum(counts)
            self._choose_and_stop(session, run, r, evaluation.get("val_dice_mean"))
            round_metrics = self._round_metrics(
                run,
                rnd,
                list(session.scalars(select(RoundSite).where(RoundSite.run_id == run_id, RoundSite.round == r))),
            )
            self.tracker.log_round(run.mlflow_run_id, r, round_metrics)
            rnd.status, rnd.closed_at = "aggregated", utcnow()
            run.current_round = r + 1
            duration = (_aware(rnd.closed_at) - _aware(rnd.started_at)).total_seconds()
            epsilon = rnd.epsilon
            aggregated = RunEvent(
                kind="round_aggregated",
                run_id=run_id,
                round=r,
                participants=len(delivered),
                val_dice=evaluation.get("val_dice_mean"),
                epsilon=epsilon,
            )
        self.ctx.progress.publish(aggregated)
        agg_metrics.rounds_aggregated_total.inc()
        agg_metrics.round_participants.observe(len(delivered))
        agg_metrics.round_duration_seconds.observe(max(duration, 0.0))
        if epsilon is not None:
            agg_metrics.privacy_epsilon.labels(run_id).set(epsilon)

    @staticmethod
    def _choose_and_stop(session: Session, run: FederatedRun, r: int, val_dice: float | None) -> None:
        """After round r's evaluation (same transaction as the round's close): the best round so far, and
        whether early stopping ends the run here."""
        earlier = session.scalars(
            select(FederatedRound.metrics)
            .where(FederatedRound.run_id == run.id, FederatedRound.round < r)
            .order_by(FederatedRound.round)
        )
        series = [(m or {}).get("val_dice_mean") for m in earlier] + [val_dice]
        best = choose_round(series)
        run.best_round = best if best is not None else r
        stopping = run.early_stopping
        if stopping and r + 1 < run.rounds and should_stop(series, int(stopping["patience"]), stopping["min_delta"]):
            run.stopped_early = True
            log.info(
                "run %s: no global val Dice gain for %s rounds: stops after round %d", run.id, stopping["patience"], r
            )

    def _evaluate(self, run: FederatedRun, state: dict[str, Any]) -> dict[str, Any]:
        if not run.evaluate:
            return {}
        from services.aggregation.evaluation import evaluate_on_sites

        return evaluate_on_sites(self.store, run, state, self.ctx.settings.evaluation_torch_threads)

    def _final_evaluation(self, run: FederatedRun) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
        """The final model's training config with its post-processing chosen on holdout.val, and its per-case
        records on holdout.test under that config; computed once and kept next to the weights (a resumed
        ``_finish`` reuses them). Without evaluation: the run's config and None."""
        if not run.evaluate:
            return run.training_config, None
        key = fs.test_evaluation_key(run.id)
        if self.store.exists(key):
            stored = json.loads(self.store.get_bytes(key))
            config, records = stored.get("training_config", run.training_config), stored["records"]
        else:
            from services.aggregation.evaluation import evaluate_on_test, resolve_final_config

            final = fs.load_weights(self.store, fs.global_key(run.id, chosen_round(run) + 1))
            threads = self.ctx.settings.evaluation_torch_threads
            config = resolve_final_config(self.store, run, final, threads)
            records = evaluate_on_test(self.store, run, final, threads, config)
            self.store.put_bytes(
                key,
                json.dumps({"records": records, "training_config": config}, allow_nan=True).encode(),
                content_type="application/json",
            )
        return config, records or None

    @staticmethod
    def _round_metrics(run: FederatedRun, rnd: FederatedRound, sites: list[RoundSite]) -> dict[str, float]:
        values: dict[str, float] = {
            "round/participants": float(rnd.num_updates),
            "round/total_samples": float(rnd.total_samples),
        }
        if rnd.epsilon is not None:
            values["privacy/epsilon"] = rnd.epsilon
        if rnd.noise_std is not None:
            values["privacy/noise_std"] = rnd.noise_std
        for name, value in (rnd.metrics.get("mean") or {}).items():
            values[f"global/{name}"] = float(value)
        for site, site_metrics in (rnd.metrics.get("sites") or {}).items():
            for name, value in site_metrics.items():
                values[f"global/{site}/{name}"] = float(value)
        for rs in sites:
            values[f"site/{rs.site}/delivered"] = 1.0 if rs.state == "delivered" else 0.0
            if rs.num_samples is not None:
                values[f"site/{rs.site}/num_samples"] = float(rs.num_samples)
            if rs.update_norm is not None:
                values[f"site/{rs.site}/update_norm"] = rs.update_norm
            for name, value in rs.metrics.items():
                values[f"site/{rs.site}/{name}"] = float(value)
        return values

    def _finish(self, session: Session, run: FederatedRun) -> None:
        """Log the curves and the chosen round's model, register a model version, mark the run succeeded."""
        chosen = chosen_round(run)
        final = self.store.get_bytes(fs.global_key(run.id, chosen + 1))
        history = []
        for rnd in session.scalars(
            select(FederatedRound).where(FederatedRound.run_id == run.id).order_by(FederatedRound.round)
        ):
            sites = list(
                session.scalars(select(RoundSite).where(RoundSite.run_id == run.id, RoundSite.round == rnd.round))
            )
            history.append({"round": rnd.round, "metrics": self._round_metrics(run, rnd, sites)})
        manifest = self._manifest(run)
        final_config, per_case = self._final_evaluation(run)
        model_files = {
            artifacts.WEIGHTS_FILE: final,
            artifacts.TRAINING_CONFIG_FILE: yaml.safe_dump(final_config, sort_keys=False).encode(),
            artifacts.PREPROCESSING_FILE: json.dumps(manifest.get("preprocessing", {}), indent=1).encode(),
            artifacts.LABELS_FILE: json.dumps(manifest.get("labels", {}), indent=1).encode(),
        }
        tags = {
            "dataset_version": run.dataset_version,
            "preprocessing_hash": str(manifest.get("preprocessing_hash", "unknown")),
            "git_sha": self.ctx.git_sha,
            "strategy": run.strategy,
            "federated_round": str(chosen),
        }
        extra = {"federated/best_round": float(chosen), "federated/rounds_run": float(run.current_round)}
        if per_case:
            from services.aggregation.evaluation import case_sites, summarise_test

            run.test_metrics = summarise_test(per_case, case_sites(self.store, run))
            for site, values in run.test_metrics["sites"].items():
                extra.update({f"test/sites/{site}/{name}": value for name, value in values.items()})
        run.model_name, run.model_version = self.tracker.finish(
            run.mlflow_run_id, run.id, history, model_files, tags, per_case=per_case, extra_metrics=extra
        )
        run.status, run.finished_at = "succeeded", utcnow()
        agg_metrics.runs_total.labels("succeeded").inc()

    def _manifest(self, run: FederatedRun) -> dict[str, Any]:
        try:
            return dict(json.loads(self.store.get_bytes(f"datasets/{run.dataset_version}/manifest.json")))
        except (KeyError, ValueError):
            return {}

    def _mark_failed(self, run: FederatedRun, reason: str) -> None:
        run.status, run.error, run.finished_at = "failed", reason, utcnow()
        agg_metrics.runs_total.labels("failed").inc()
        log.error("federated run %s failed: %s", run.id, reason)
        try:
            self.tracker.fail(run.mlflow_run_id, reason)
        except Exception:
            log.exception("could not mark MLflow run %s failed", run.mlflow_run_id)

    def _fail(self, run_id: str, reason: str) -> None:
        with session_scope(self.ctx.session_factory) as session:
            run = session.get(FederatedRun, run_id)
            if run is not None and run.status not in TERMINAL_STATUSES:
                self._mark_failed(run, reason)


def resume_running_runs(ctx: AggregationContext) -> list[str]:
    """Take over every unfinished run (called when an aggregator worker starts)."""
    with session_scope(ctx.session_factory) as session:
        run_ids = list(session.scalars(select(FederatedRun.id).where(FederatedRun.status.in_(("pending", "running")))))
    for run_id in run_ids:
        ctx.kick(run_id, force=True)
    return run_ids
