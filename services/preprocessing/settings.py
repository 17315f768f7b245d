"""Configuration of the preprocessing service (environment variables ``VOXELFLOW_*``)."""

from __future__ import annotations

from pydantic import Field

from shared.settings import VoxelflowSettings


class PreprocessingSettings(VoxelflowSettings):
    preprocessing_queue: str = Field(
        default="preprocessing",
        description="Queue of the preprocessing worker: 'series ready' messages, dataset builds, precompute jobs.",
    )
    default_spec: str = Field(
        default="mr_hippocampus",
        description="Preprocessing spec (name under shared/preprocessing/specs or a YAML path) used when a "
        "dataset build request names none.",
    )
    catalogue_collection: str = Field(
        default="catalogue",
        description="Collection name under which series reconstructed by ingest are recorded as candidate cases.",
    )
    max_label_bytes: int = Field(
        default=512 * 1024**2, description="Largest label NIfTI accepted by the label upload endpoint."
    )
    max_case_file_bytes: int = Field(
        default=1024**3, description="Largest image or label NIfTI accepted by the case upload endpoint."
    )
