"""The catalogue: patients (pseudonyms only), studies, series and instances, plus pull jobs and the
re-identification map. Every UID stored here is the pseudonymised one; originals live only in
:class:`ReidentificationEntry`, which only ``admin`` can read."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from shared.db.base import Base, utcnow

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version_ingest"


class Patient(Base):
    __tablename__ = "ingest_patients"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pseudonym: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "ingest_studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("ingest_patients.id"), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8), index=True)  # YYYYMMDD (shifted)
    study_time: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(64))
    study_description: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "ingest_series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("ingest_studies.id"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16), index=True)
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(256))
    #: the SeriesDescription as the sender sent it, which de-identification removes (PS3.15 basic profile):
    #: kept for inference's routing rules only (the routing offer), never in the catalogue's answers
    routing_description: Mapped[str | None] = mapped_column(String(256), default=None)
    manufacturer: Mapped[str | None] = mapped_column(String(128))
    site: Mapped[str] = mapped_column(String(128))
    # receiving → volume | flagged | failed; back to receiving when a new instance arrives.
    status: Mapped[str] = mapped_column(String(16), default="receiving")
    generation: Mapped[int] = mapped_column(Integer, default=0)
    last_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    non_volumetric_reason: Mapped[str | None] = mapped_column(Text)
    volumes: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "ingest_instances"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("ingest_series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    object_key: Mapped[str] = mapped_column(String(512))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    content_hash: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(16))
    #: the AE title that C-STOREd the instance (routing rules match on it); NULL for STOW-RS and WADO pulls
    calling_ae_title: Mapped[str | None] = mapped_column(String(16), default=None)
    # pending: row claimed, blob being written; stored: blob durable. A pending row is completed by the
    # next delivery of the same content, so a crash between the two steps loses nothing.
    state: Mapped[str] = mapped_column(String(16), default="pending")
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # DICOM JSON (PS3.18 F.2) of the de-identified header, without bulk data: serves QIDO includefield
    # and WADO-RS metadata without touching object storage.
    dicom_json: Mapped[dict[str, Any]] = mapped_column(JSON)
    series: Mapped[Series] = relationship(back_populates="instances")


class ReidentificationEntry(Base):
    """Pseudonym ↔ original. Kept apart from the catalogue; readable only by ``admin``."""

    __tablename__ = "ingest_reidentification"
    __table_args__ = (UniqueConstraint("kind", "pseudonym"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # patient | uid
    pseudonym: Mapped[str] = mapped_column(String(64))
    original: Mapped[str] = mapped_column(String(128), index=True)
    date_offset_days: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class PullJob(Base):
    __tablename__ = "ingest_pull_jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    pacs: Mapped[str] = mapped_column(String(64))
    query: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="queued")  # queued|running|done|failed
    studies_found: Mapped[int] = mapped_column(Integer, default=0)
    instances_stored: Mapped[int] = mapped_column(Integer, default=0)
    instances_failed: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    requested_by: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(default=None)
