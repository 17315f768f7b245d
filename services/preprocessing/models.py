"""Tables of the preprocessing service: the pool of candidate cases, dataset builds, the immutable dataset
versions (whose full content is the manifest in object storage) and precompute jobs.

A candidate case is a mutable pointer (a label can be attached later); a dataset version is not: it
copies the hashes of every case into its manifest, so later changes never alter an existing version.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from shared.db.base import Base, utcnow

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version_preprocessing"


class Case(Base):
    """A case that may go into dataset versions: an image (optionally a label) stored content-addressed."""

    __tablename__ = "preprocessing_cases"
    __table_args__ = (UniqueConstraint("collection", "case_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    collection: Mapped[str] = mapped_column(String(128), index=True)  # MSD import name, or "catalogue"
    case_id: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(512), unique=True)  # msd:<relative path> | catalogue:<series uid>
    patient: Mapped[str] = mapped_column(String(128), index=True)
    site: Mapped[str | None] = mapped_column(String(128))  # where it came from (catalogue); None for MSD
    modality: Mapped[str] = mapped_column(String(16))
    image_key: Mapped[str] = mapped_column(String(512))
    image_sha256: Mapped[str] = mapped_column(String(64))
    label_key: Mapped[str | None] = mapped_column(String(512))
    label_sha256: Mapped[str | None] = mapped_column(String(64))
    case_hash: Mapped[str] = mapped_column(String(64))
    # shape, spacing_mm, volume_mm3, intensity_mean, label_voxels: what non-IID site assignment sorts by
    stats: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class DatasetBuild(Base):
    """A request to build a dataset version; the worker turns it into a :class:`DatasetVersion`."""

    __tablename__ = "preprocessing_builds"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="queued")  # queued|running|done|failed
    version_id: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    requested_by: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class DatasetVersion(Base):
    """Index row of an immutable, content-addressed dataset version (the manifest holds everything)."""

    __tablename__ = "preprocessing_dataset_versions"

    version_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    manifest_key: Mapped[str] = mapped_column(String(512))
    spec_name: Mapped[str] = mapped_column(String(200))
    preprocessing_hash: Mapped[str] = mapped_column(String(64))
    case_count: Mapped[int] = mapped_column(Integer)
    excluded_count: Mapped[int] = mapped_column(Integer)
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    site_counts: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    split_names: Mapped[list[str]] = mapped_column(JSON, default=list)
    qc_report: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    build_config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_by: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class DatasetVersionCase(Base):
    """Which cases a version holds and at which site: lets the API answer "which versions use this case"."""

    __tablename__ = "preprocessing_version_cases"

    version_id: Mapped[str] = mapped_column(ForeignKey("preprocessing_dataset_versions.version_id"), primary_key=True)
    case_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    case_hash: Mapped[str] = mapped_column(String(64), index=True)
    patient: Mapped[str] = mapped_column(String(128))
    site: Mapped[str] = mapped_column(String(128))
    excluded: Mapped[bool] = mapped_column(Boolean, default=False)


class PrecomputeJob(Base):
    """Preprocessing of a version's cases into ``preprocessed/{pipeline_hash}/{case_hash}.pt``."""

    __tablename__ = "preprocessing_jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    version_id: Mapped[str] = mapped_column(ForeignKey("preprocessing_dataset_versions.version_id"), index=True)
    pipeline_hash: Mapped[str] = mapped_column(String(64))
    case_ids: Mapped[list[str]] = mapped_column(JSON, default=list)  # empty = every included case
    status: Mapped[str] = mapped_column(String(16), default="queued")  # queued|running|done|failed
    total: Mapped[int] = mapped_column(Integer, default=0)
    computed: Mapped[int] = mapped_column(Integer, default=0)
    cached: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    requested_by: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(default=None)
