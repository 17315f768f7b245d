"""Celery task names, the queues they travel on, and their time limits (sender and worker import these).

Why time limits here: the task's owner knows how long it may take, the sender does not care; a task without
a hard limit that hangs (a stalled S3 read, a deadlocked DataLoader) would hold its worker slot for ever.
The soft limit raises ``SoftTimeLimitExceeded`` inside the task first, so it can stop cleanly; the hard limit
kills the process child. A deployment overrides them per task name (``VOXELFLOW_TASK_TIME_LIMITS``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskContract:
    name: str
    #: the default queue (None: per site, see :func:`training_queue`)
    queue: str | None
    soft_time_limit: float
    time_limit: float


MINUTE, HOUR = 60.0, 3600.0

# queues (a service's own queue is its service name unless its settings say otherwise)
INGEST_QUEUE = "ingest"
PREPROCESSING_QUEUE = "preprocessing"
AGGREGATION_QUEUE = "aggregation"
INFERENCE_QUEUE = "inference"
TRAINING_QUEUE_PREFIX = "training."


def training_queue(site: str, prefix: str = TRAINING_QUEUE_PREFIX) -> str:
    """The queue the training worker of ``site`` consumes and aggregation sends that site's rounds to."""
    return f"{prefix}{site}"


# ingest: finalising a series reconstructs one volume; a PACS pull moves a whole study
FINALIZE_SERIES = TaskContract("ingest.finalize_series", INGEST_QUEUE, 10 * MINUTE, 11 * MINUTE)
PULL_FROM_PACS = TaskContract("ingest.pull_from_pacs", INGEST_QUEUE, 1 * HOUR, 1 * HOUR + 5 * MINUTE)
# preprocessing: recording a series is one row; a build or a precompute walks a whole dataset
SERIES_READY = TaskContract("preprocessing.series_ready", PREPROCESSING_QUEUE, 5 * MINUTE, 6 * MINUTE)
BUILD_DATASET = TaskContract("preprocessing.build_dataset", PREPROCESSING_QUEUE, 1 * HOUR, 1 * HOUR + 5 * MINUTE)
PRECOMPUTE = TaskContract("preprocessing.precompute", PREPROCESSING_QUEUE, 6 * HOUR, 6 * HOUR + 10 * MINUTE)
# training: a round is long; below the broker's visibility timeout (6 h) so a round never runs twice at once
TRAIN_ROUND = TaskContract("training.train_round", None, 5 * HOUR + 30 * MINUTE, 5 * HOUR + 45 * MINUTE)
# aggregation: one advance polls for poll_task_budget_seconds (30 s), then aggregates / registers the model
ADVANCE_RUN = TaskContract("aggregation.advance_run", AGGREGATION_QUEUE, 30 * MINUTE, 35 * MINUTE)
# inference: one segmentation (sliding window on CPU at worst)
SEGMENT = TaskContract("inference.segment", INFERENCE_QUEUE, 30 * MINUTE, 35 * MINUTE)
# inference: routing a completed series against the rules only reads rules and queues segmentations
ROUTE_SERIES = TaskContract("inference.route_series", INFERENCE_QUEUE, 2 * MINUTE, 3 * MINUTE)
# inference: an export rebuilds the network, runs the parity gate on a few cases, writes ONNX/TorchScript
EXPORT_MODEL = TaskContract("inference.export_model", INFERENCE_QUEUE, 30 * MINUTE, 32 * MINUTE)

ALL_TASKS = (
    FINALIZE_SERIES,
    PULL_FROM_PACS,
    SERIES_READY,
    BUILD_DATASET,
    PRECOMPUTE,
    TRAIN_ROUND,
    ADVANCE_RUN,
    SEGMENT,
    ROUTE_SERIES,
    EXPORT_MODEL,
)

# the names as plain strings, for send_task and shared_task(name=...)
FINALIZE_SERIES_TASK = FINALIZE_SERIES.name
PULL_FROM_PACS_TASK = PULL_FROM_PACS.name
SERIES_READY_TASK = SERIES_READY.name
BUILD_DATASET_TASK = BUILD_DATASET.name
PRECOMPUTE_TASK = PRECOMPUTE.name
TRAIN_ROUND_TASK = TRAIN_ROUND.name
ADVANCE_RUN_TASK = ADVANCE_RUN.name
SEGMENT_TASK = SEGMENT.name
ROUTE_SERIES_TASK = ROUTE_SERIES.name
EXPORT_MODEL_TASK = EXPORT_MODEL.name


def limits(contract: TaskContract) -> dict[str, float]:
    """``shared_task(**limits(X))``: the contract's soft and hard limit as task options."""
    return {"soft_time_limit": contract.soft_time_limit, "time_limit": contract.time_limit}
