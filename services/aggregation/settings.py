"""Configuration of the aggregation service (environment variables ``VOXELFLOW_*``)."""

from __future__ import annotations

from pydantic import Field

from shared.contracts.tasks import TRAINING_QUEUE_PREFIX
from shared.settings import VoxelflowSettings


class AggregationSettings(VoxelflowSettings):
    aggregation_queue: str = Field(
        default="aggregation", description="Queue of the aggregator's own task (aggregation.advance_run)."
    )
    training_queue_prefix: str = Field(
        default=TRAINING_QUEUE_PREFIX,
        description="Round tasks for site S go to queue '<prefix>S' (the site's worker; the same setting there).",
    )
    poll_interval_seconds: float = Field(
        default=2.0, gt=0, description="How often a collecting round looks for new updates in object storage."
    )
    poll_task_budget_seconds: float = Field(
        default=30.0,
        gt=0,
        description="How long one advance_run task polls a collecting round before handing over to a new "
        "message; run the worker with a concurrency of at least the number of simultaneous runs.",
    )
    default_round_timeout_seconds: float = Field(
        default=3600.0, gt=0, description="Round timeout used when a run does not give one."
    )
    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking server every federated run is logged to; unset = no MLflow logging "
        "(single-machine trials only; the local stack and the chart set it).",
    )
    mlflow_experiment: str = Field(default="voxelflow-federated", description="MLflow experiment of federated runs.")
    registered_model_name: str = Field(
        default="voxelflow-segmentation", description="Registered model that each finished run adds a version to."
    )
    evaluation_torch_threads: int = Field(
        default=1,
        ge=1,
        description="torch threads the aggregator uses to score the global model (sites' holdout.val after each "
        "round, holdout.test at the end); it shares its CPU with the polling of other runs.",
    )
    git_sha: str | None = Field(
        default=None, description="Code version logged with every run; read from git when unset."
    )
