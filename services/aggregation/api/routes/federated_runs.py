"""Federated training runs: start one, follow it round by round and site by site, list, cancel."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import select

from services.aggregation import federated_storage as fs
from services.aggregation.api.deps import ContextDep, RunCaller, SessionDep
from services.aggregation.dataset_check import DatasetProblem, check_sites
from services.aggregation.evaluation import evaluation_available
from services.aggregation.model_setup import check_federated_training, resolve_training_config
from services.aggregation.models import (
    TERMINAL_STATUSES,
    FederatedRound,
    FederatedRun,
    RoundSite,
    SiteUpdate,
    chosen_round,
)
from services.aggregation.privacy import PrivacyConfig
from services.aggregation.strategies import ServerOptimizerConfig, Strategy
from shared.contracts import progress
from shared.contracts.progress import RunEvent
from shared.db.base import utcnow
from shared.http import add_audit_uids
from shared.training.config import TrainingConfig
from shared.validation import SAFE_TEXT_PATTERN, DatasetVersionId, PageOffset, ResourceId, SafeText

router = APIRouter(prefix="/federated-runs", tags=["federated training"])

SITE = rf"^{fs.SITE_PATTERN}$"


class PrivacyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    clip_norm: float = Field(gt=0, description="L2 bound of each site's update (over all weights).")
    noise_multiplier: float = Field(ge=0, description="Gaussian noise std on the mean, in units of its sensitivity.")
    delta: float = Field(default=1e-5, gt=0, lt=1, description="δ of the (ε, δ) guarantee that is reported.")


class ServerOptimizerIn(BaseModel):
    """Defaults: :class:`ServerOptimizerConfig` (tuned for this problem, see docs/training.md)."""

    model_config = ConfigDict(extra="forbid")
    lr: float = Field(default=ServerOptimizerConfig.lr, gt=0)
    beta1: float = Field(default=ServerOptimizerConfig.beta1, ge=0, lt=1)
    beta2: float = Field(default=ServerOptimizerConfig.beta2, ge=0, lt=1)
    tau: float = Field(default=ServerOptimizerConfig.tau, gt=0)


class EarlyStoppingIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    patience: int = Field(ge=1, le=1000, description="Rounds in a row without a global val Dice gain.")
    min_delta: float = Field(default=0.0, ge=0, description="The smallest rise of the val Dice that counts.")


SiteName = Annotated[str, Field(pattern=SITE, description="a queue name: lower-case letters, digits, '-'")]


class FederatedRunCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        # For the OpenAPI document (the validator below enforces it): fedprox_mu only with strategy fedprox.
        json_schema_extra={
            "anyOf": [
                {"properties": {"fedprox_mu": {"maximum": 0}}},
                {"required": ["strategy"], "properties": {"strategy": {"const": Strategy.FEDPROX.value}}},
            ]
        },
    )
    dataset_version: DatasetVersionId = Field(description="e.g. ds-0123456789abcdef")
    sites: list[SiteName] = Field(
        min_length=1,
        max_length=64,
        description="Sites that train; each has queue training.<site>.",
        json_schema_extra={"uniqueItems": True},
    )
    rounds: int = Field(ge=1, le=1000)
    local_epochs: int = Field(default=1, ge=1, le=1000)
    strategy: Strategy = Strategy.FEDAVG
    fedprox_mu: float = Field(default=0.0, ge=0, description="FedProx proximal weight (strategy fedprox only).")
    server_optimizer: ServerOptimizerIn = Field(
        default_factory=ServerOptimizerIn, description="FedAdam/FedYogi server optimiser."
    )
    min_sites: int | None = Field(default=None, ge=1, description="Quorum per round; default: every site.")
    round_timeout_seconds: float | None = Field(default=None, gt=0, le=7 * 24 * 3600)
    privacy: PrivacyIn | None = Field(default=None, description="Update clipping + Gaussian noise; off by default.")
    training_config: TrainingConfig = Field(
        default_factory=TrainingConfig,
        description="What each site trains (shared.training.TrainingConfig); the fields left out come from the "
        "dataset version's plan (GET /datasets/{id}/plan of the preprocessing API) unless use_plan is false.",
    )
    use_plan: bool = Field(
        default=True,
        description="Fill the training_config fields the request leaves out from the dataset version's plan "
        "(nnU-Net-style: patch, batch size, network topology); the run's plan_fields lists them.",
    )
    initial_weights_key: str | None = Field(
        default=None,
        max_length=1024,
        pattern=SAFE_TEXT_PATTERN,
        description="Warm start: the object-storage key of a state dict.",
    )
    evaluate: bool = Field(
        default=True,
        description="Score the global model on each site's holdout.val after every round and on holdout.test at "
        "the end (per-case Dice logged and attached to the registered version for the promotion gate).",
    )
    seed: int = Field(default=0, ge=0, lt=2**31)
    keep_optimizer_state: bool = Field(
        default=True,
        description="Each site continues its optimiser state (Adam moments, step counts) from its last round "
        "instead of starting fresh every round; kept at the site (site-private), never sent to the aggregator.",
    )
    local_norm_layers: bool = Field(
        default=False,
        description="FedBN: sites keep their own normalisation layers; they stay out of the server step, and "
        "the global model that is evaluated and registered holds their plain sample-weighted mean.",
    )
    early_stopping: EarlyStoppingIn | None = Field(
        default=None,
        description="Stop once the global validation Dice has not improved for `patience` rounds (needs "
        "evaluate); whether or not it stops, the registered model is the round with the best one.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> FederatedRunCreate:
        if len(set(self.sites)) != len(self.sites):
            raise ValueError("sites must be unique")
        if self.min_sites is not None and self.min_sites > len(self.sites):
            raise ValueError(f"min_sites {self.min_sites} exceeds the {len(self.sites)} sites")
        if self.fedprox_mu > 0 and self.strategy is not Strategy.FEDPROX:
            raise ValueError("fedprox_mu applies only to strategy 'fedprox'")
        if self.early_stopping is not None and not self.evaluate:
            raise ValueError("early_stopping follows the global validation Dice: it needs evaluate=true")
        return self


class SiteProgress(BaseModel):
    site: str
    attempt_id: str
    state: str
    num_samples: int | None
    metrics: dict[str, float]
    update_norm: float | None
    reason: str | None
    delivered_at: dt.datetime | None


class DiscardedUpdate(BaseModel):
    site: str
    attempt_id: str
    key: str
    reason: str | None
    seen_at: dt.datetime


class RoundProgress(BaseModel):
    round: int
    status: str
    started_at: dt.datetime
    deadline: dt.datetime
    closed_at: dt.datetime | None
    num_updates: int
    total_samples: int
    metrics: dict[str, Any]
    epsilon: float | None
    noise_std: float | None
    error: str | None
    sites: list[SiteProgress]
    discarded: list[DiscardedUpdate]


class RunSummary(BaseModel):
    id: str
    status: str
    dataset_version: str
    sites: list[str]
    strategy: str
    rounds: int
    current_round: int
    min_sites: int
    epsilon: float | None
    error: str | None
    created_by: str | None
    created_at: dt.datetime
    finished_at: dt.datetime | None
    mlflow_run_id: str | None
    model_name: str | None
    model_version: str | None
    best_round: int | None = Field(description="The round whose global model has the best global val Dice so far.")
    stopped_early: bool


class RunDetail(RunSummary):
    local_epochs: int
    fedprox_mu: float
    server_optimizer: dict[str, float]
    round_timeout_seconds: float
    privacy: dict[str, float] | None
    training_config: dict[str, Any]
    plan_fields: list[str] = Field(description="training_config fields taken from the dataset version's plan.")
    evaluate: bool
    seed: int
    keep_optimizer_state: bool
    local_norm_layers: bool
    early_stopping: dict[str, float] | None
    final_weights_key: str | None = Field(description="The registered model: the global model of best_round.")
    test_metrics: dict[str, Any] | None = Field(
        description="The registered model on holdout.test: pooled over every case and per site "
        "({pooled: {dice_mean, cases, <label>/dice, ...}, sites: {site: {...}}})."
    )
    round_progress: list[RoundProgress]


def _summary(run: FederatedRun) -> dict[str, Any]:
    return {name: getattr(run, name) for name in RunSummary.model_fields}


def _detail(session: SessionDep, run: FederatedRun) -> RunDetail:
    rounds = list(
        session.scalars(select(FederatedRound).where(FederatedRound.run_id == run.id).order_by(FederatedRound.round))
    )
    sites = list(session.scalars(select(RoundSite).where(RoundSite.run_id == run.id).order_by(RoundSite.site)))
    discarded = list(
        session.scalars(
            select(SiteUpdate)
            .where(SiteUpdate.run_id == run.id, SiteUpdate.status == "discarded")
            .order_by(SiteUpdate.id)
        )
    )
    progress = [
        RoundProgress(
            **{name: getattr(rnd, name) for name in RoundProgress.model_fields if name not in ("sites", "discarded")},
            sites=[
                SiteProgress(**{n: getattr(rs, n) for n in SiteProgress.model_fields})
                for rs in sites
                if rs.round == rnd.round
            ],
            discarded=[
                DiscardedUpdate(**{n: getattr(u, n) for n in DiscardedUpdate.model_fields})
                for u in discarded
                if u.round == rnd.round
            ],
        )
        for rnd in rounds
    ]
    return RunDetail(
        **_summary(run),
        local_epochs=run.local_epochs,
        fedprox_mu=run.fedprox_mu,
        server_optimizer=run.server_optimizer,
        round_timeout_seconds=run.round_timeout_seconds,
        privacy=run.privacy,
        training_config=run.training_config,
        plan_fields=run.plan_fields or [],
        evaluate=run.evaluate,
        seed=run.seed,
        keep_optimizer_state=run.keep_optimizer_state,
        local_norm_layers=run.local_norm_layers,
        early_stopping=run.early_stopping,
        final_weights_key=fs.global_key(run.id, chosen_round(run) + 1) if run.status == "succeeded" else None,
        test_metrics=run.test_metrics,
        round_progress=progress,
    )


@router.post(
    "",
    response_model=RunDetail,
    status_code=201,
    responses={
        404: {"description": "the dataset version, a site's training cases or the initial weights do not exist"},
        422: {"description": "an invalid request, or min_sites above the number of sites"},
    },
)
async def create_run(
    body: FederatedRunCreate, request: Request, ctx: ContextDep, session: SessionDep, principal: RunCaller
) -> RunDetail:
    """Check the dataset version and sites, persist the run, and hand it to the aggregator worker."""
    # What the request names but does not exist (the version, its sites, the weights) is a 404, as an
    # unknown id in a path would be; the OpenAPI document cannot know what exists.
    try:
        await anyio.to_thread.run_sync(check_sites, ctx.store, body.dataset_version, body.sites)
    except DatasetProblem as exc:
        raise HTTPException(exc.status, str(exc)) from exc
    if body.initial_weights_key and not await anyio.to_thread.run_sync(ctx.store.exists, body.initial_weights_key):
        raise HTTPException(404, f"initial_weights_key {body.initial_weights_key!r} does not exist in object storage")
    if body.evaluate and (problem := evaluation_available()):
        raise HTTPException(422, f"{problem}; create the run with evaluate=false")
    resolved, plan_fields = await anyio.to_thread.run_sync(
        resolve_training_config, ctx.store, body.dataset_version, body.training_config, body.use_plan
    )
    training_config = resolved.model_dump(mode="json")
    try:
        check_federated_training(training_config, body.rounds, body.local_epochs, body.local_norm_layers)
        if body.privacy:
            PrivacyConfig(**body.privacy.model_dump())
        ServerOptimizerConfig(**body.server_optimizer.model_dump())
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from exc
    run_id = f"fr-{uuid.uuid4().hex[:16]}"
    add_audit_uids(request, run_id, body.dataset_version)
    poll_task_id = uuid.uuid4().hex
    run = FederatedRun(
        id=run_id,
        status="pending",
        dataset_version=body.dataset_version,
        sites=list(body.sites),
        rounds=body.rounds,
        local_epochs=body.local_epochs,
        strategy=body.strategy.value,
        fedprox_mu=body.fedprox_mu,
        server_optimizer=body.server_optimizer.model_dump(),
        min_sites=body.min_sites or len(body.sites),
        round_timeout_seconds=body.round_timeout_seconds or ctx.settings.default_round_timeout_seconds,
        privacy=body.privacy.model_dump() if body.privacy else None,
        training_config=training_config,
        plan_fields=plan_fields,
        initial_weights_key=body.initial_weights_key,
        evaluate=body.evaluate,
        seed=body.seed,
        keep_optimizer_state=body.keep_optimizer_state,
        local_norm_layers=body.local_norm_layers,
        early_stopping=body.early_stopping.model_dump() if body.early_stopping else None,
        created_by=principal.name,
        poll_task_id=poll_task_id,
    )
    session.add(run)
    session.commit()
    await anyio.to_thread.run_sync(lambda: ctx.kick(run_id, task_id=poll_task_id))
    return _detail(session, run)


@router.get("", response_model=list[RunSummary])
def list_runs(
    session: SessionDep,
    principal: RunCaller,
    status: Annotated[SafeText | None, Query(description="Only runs with this status.")] = None,
    limit: int = Query(default=50, ge=1, le=500),
    offset: PageOffset = 0,
) -> list[RunSummary]:
    query = select(FederatedRun).order_by(FederatedRun.created_at.desc(), FederatedRun.id)
    if status:
        query = query.where(FederatedRun.status == status)
    return [RunSummary(**_summary(run)) for run in session.scalars(query.limit(limit).offset(offset))]


@router.get("/{run_id}", response_model=RunDetail)
def get_run(run_id: ResourceId, session: SessionDep, principal: RunCaller) -> RunDetail:
    """The run with every round's aggregate metrics, each site's state and every discarded update."""
    run = session.get(FederatedRun, run_id)
    if run is None:
        raise HTTPException(404, f"no federated run {run_id}")
    return _detail(session, run)


@router.post("/{run_id}/cancel", response_model=RunDetail)
def cancel_run(run_id: ResourceId, ctx: ContextDep, session: SessionDep, principal: RunCaller) -> RunDetail:
    """Stop a run: no further round is dispatched or aggregated; the current round's site tasks are revoked."""
    run = session.scalar(select(FederatedRun).where(FederatedRun.id == run_id).with_for_update())
    if run is None:
        raise HTTPException(404, f"no federated run {run_id}")
    if run.status in TERMINAL_STATUSES:
        raise HTTPException(409, f"run {run_id} is already {run.status}")
    run.status, run.finished_at = "cancelled", utcnow()
    run.error = f"cancelled by {principal.name}"
    pending = [
        rs.attempt_id
        for rs in session.scalars(
            select(RoundSite).where(
                RoundSite.run_id == run_id, RoundSite.round == run.current_round, RoundSite.state == "dispatched"
            )
        )
    ]
    session.commit()
    if pending:
        ctx.celery.control.revoke(pending)
    ctx.progress.publish(
        RunEvent(kind="run_finished", run_id=run_id, round=run.current_round, status=run.status, error=run.error)
    )
    return _detail(session, run)


# A Redis stream id, or empty (no resume). A plain string rather than `str | None`: an optional header's
# `null` schema branch has no wire form, so clients (and schemathesis) would send the text "null".
STREAM_ID = r"^(?:[0-9]{1,20}-[0-9]{1,20})?$"
#: how long one read of the stream waits for new events before the run's status is looked at again
EVENTS_BLOCK_MS = 1000


def _stream_id(entry_id: str) -> tuple[int, int]:
    first, second = entry_id.split("-")
    return int(first), int(second)


def _sse(event: RunEvent, entry_id: str | None, extra: dict[str, Any]) -> bytes:
    data = json.dumps({**event.model_dump(exclude_none=True), **extra})
    head = f"id: {entry_id}\n" if entry_id else ""
    return f"{head}event: {event.kind}\ndata: {data}\n\n".encode()


def _status(ctx: Any, run_id: str) -> tuple[str, str | None, int]:
    with ctx.session_factory() as session:
        run = session.get(FederatedRun, run_id)
        assert run is not None  # runs are never deleted
        return run.status, run.error, run.current_round


async def follow_events(
    ctx: Any, run_id: str, rounds: int, after: str | None, block_ms: int = EVENTS_BLOCK_MS
) -> AsyncIterator[bytes]:
    """The run's events as SSE: every event after ``after`` (all of them without it), then the live ones, until
    the run has finished. Epoch events get ``eta_seconds`` (that site's time left if it trains every remaining
    round, from its recent epoch durations); the stream is always read from its start so that the ETA of a
    reconnected client has the same history."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(ctx.settings.broker_url, socket_timeout=block_ms / 1000 + 5)
    key, cursor = progress.stream_key(run_id), "0-0"
    resume_after = _stream_id(after) if after else (0, 0)
    durations: dict[str, list[float]] = defaultdict(list)
    try:
        while True:
            reply: Any = await client.xread({key: cursor}, count=500, block=block_ms)
            entries: list[Any] = reply[0][1] if reply else []
            for raw_id, fields in entries:
                cursor = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                try:
                    event = progress.decode(fields)
                except ValueError:
                    continue  # an entry of an incompatible writer: skipped, not fatal to the stream
                extra: dict[str, Any] = {}
                if event.kind == "epoch" and event.site and event.seconds is not None:
                    durations[event.site].append(event.seconds)
                    left = progress.site_epochs_left(rounds, event.epochs or 0, event.round or 0, event.epoch or 0)
                    extra["eta_seconds"] = progress.eta_seconds(durations[event.site], left)
                if _stream_id(cursor) > resume_after:
                    yield _sse(event, cursor, extra)
                if event.kind == "run_finished":
                    return
            if not entries:
                status, error, current_round = await anyio.to_thread.run_sync(_status, ctx, run_id)
                if status in TERMINAL_STATUSES:  # its run_finished event was lost (Redis down when it was sent)
                    final = RunEvent(kind="run_finished", run_id=run_id, round=current_round, status=status)
                    yield _sse(final.model_copy(update={"error": error}), None, {})
                    return
                yield b": waiting\n\n"  # a comment: keeps proxies from timing the connection out
    finally:
        await client.aclose()


@router.get(
    "/{run_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": "Server-Sent Events: epoch, round_started, round_aggregated, run_finished (the last).",
        },
        404: {"description": "no such run"},
    },
)
async def run_events(
    run_id: ResourceId,
    ctx: ContextDep,
    principal: RunCaller,
    last_event_id: Annotated[
        str,
        Header(pattern=STREAM_ID, description="Resume after this event id (sent by EventSource on reconnect)."),
    ] = "",
) -> StreamingResponse:
    """The run's progress live (docs/federated.md): per-epoch loss, val Dice and ETA of every site, round
    starts and aggregations with the global val Dice and ε, and the end of the run; past events first."""

    def load() -> FederatedRun | None:
        with ctx.session_factory() as session:
            return session.get(FederatedRun, run_id)

    run = await anyio.to_thread.run_sync(load)
    if run is None:
        raise HTTPException(404, f"no federated run {run_id}")
    return StreamingResponse(
        follow_events(ctx, run_id, run.rounds, last_event_id or None),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
