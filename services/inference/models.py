"""One table: a row per segmentation request, the durable record a job and its client share."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Boolean, Float, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from shared.contracts import layout
from shared.db.base import Base, utcnow

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version_inference"


class SegmentationRequest(Base):
    """Status moves queued → running → succeeded | failed. Outputs are object-storage keys."""

    __tablename__ = "inference_requests"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    source_kind: Mapped[str] = mapped_column(String(32))  # series_instance_uid | dicomweb_series_url | nifti_uri
    source_ref: Mapped[str] = mapped_column(String(2048))
    patient_ref: Mapped[str | None] = mapped_column(
        String(64)
    )  # keyed pseudonym (shared.pseudonyms), never the PatientID
    model_alias: Mapped[str] = mapped_column(String(64))
    route: Mapped[str | None] = mapped_column(String(16))  # champion | candidate
    model_name: Mapped[str | None] = mapped_column(String(200))
    model_version: Mapped[str | None] = mapped_column(String(64))
    registry_uri: Mapped[str | None] = mapped_column(String(512))
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    voxels: Mapped[int | None] = mapped_column(Integer)
    mask_key: Mapped[str | None] = mapped_column(String(512))
    seg_key: Mapped[str | None] = mapped_column(String(512))
    findings_key: Mapped[str | None] = mapped_column(String(512))
    findings: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    pacs_status: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    latency_seconds: Mapped[float | None] = mapped_column(Float)
    created_by: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(default=None)

    @property
    def sr_key(self) -> str | None:
        """The DICOM SR is written with the SEG, at a key fixed by the request ID (no column of its own)."""
        return layout.inference_sr_key(self.id) if self.seg_key else None


class ModelExport(Base):
    """An export of a registry version for serving (ONNX + TorchScript through the parity gate, then the
    Triton repository). Status moves queued → running → succeeded | failed; ``result`` holds what the CLI
    and the demo print (parity figures, attached artifacts, Triton keys, TensorRT outcome, pruned versions)."""

    __tablename__ = "inference_model_exports"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    model_uri: Mapped[str] = mapped_column(String(512))
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class RoutingRule(Base):
    """An operator's routing rule (:mod:`services.inference.routing`): which completed series are segmented
    automatically (every criterion optional: empty = any), by which model alias, sent to which destination
    (empty: the service's ``pacs_url``)."""

    __tablename__ = "inference_routing_rules"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    series_description_pattern: Mapped[str | None] = mapped_column(String(256))
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    site: Mapped[str | None] = mapped_column(String(128))
    model_alias: Mapped[str] = mapped_column(String(64))
    destination: Mapped[str | None] = mapped_column(String(512))
    created_by: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
