"""Configuration of a site's training worker (environment variables ``VOXELFLOW_*``)."""

from __future__ import annotations

from pydantic import Field

from shared.contracts.tasks import TRAINING_QUEUE_PREFIX
from shared.settings import VoxelflowSettings


class TrainingWorkerSettings(VoxelflowSettings):
    site: str = Field(
        default="local",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="The site this worker trains for: it consumes queue 'training.<site>' and reads only this "
        "site's cases; a round task addressed to another site is refused.",
    )
    training_queue_prefix: str = Field(
        default=TRAINING_QUEUE_PREFIX,
        description="This worker consumes queue '<prefix><site>' (aggregation's training_queue_prefix must match).",
    )
    device: str | None = Field(
        default=None, description="torch device (cpu, cuda, cuda:1); default: CUDA when present, else CPU."
    )
    torch_threads: int | None = Field(
        default=None, description="torch.set_num_threads for training on CPU; default: PyTorch's choice."
    )
    visibility_timeout_seconds: int = Field(
        default=6 * 3600,
        ge=1,
        description="Seconds before Redis redelivers an unacknowledged round task (a worker killed mid-round). "
        "Must exceed the longest round, or a still-running round is also started elsewhere.",
    )
    api_port: int = Field(default=8000, description="Port of the health/metrics app (main.py).")
