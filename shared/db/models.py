"""Tables every service shares: API tokens, the audit log and the Celery dead-letter record."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, BigInteger, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from shared.db.base import Base, utcnow


class ApiToken(Base):
    """A bearer token. Only its SHA-256 is stored: a database leak does not leak usable credentials."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    role: Mapped[str] = mapped_column(String(32))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    #: refused (401) from then on; None: never expires (service-to-service tokens only)
    expires_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    #: the only project the token may act in; None: any
    project: Mapped[str | None] = mapped_column(String(200), default=None)


class AuditEvent(Base):
    """One row per authenticated-or-refused request: who, with which role, did what to which objects."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    occurred_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    service: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[str] = mapped_column(String(64))
    principal: Mapped[str | None] = mapped_column(String(200))
    role: Mapped[str | None] = mapped_column(String(32))
    method: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(String(2048))
    object_uids: Mapped[list[str]] = mapped_column(JSON, default=list)
    status_code: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(16))
    client: Mapped[str | None] = mapped_column(String(128))


class DeadLetter(Base):
    """A Celery task that exhausted its retries, kept with its arguments and reason so it can be retried."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    service: Mapped[str] = mapped_column(String(64), index=True)
    task_id: Mapped[str] = mapped_column(String(64), unique=True)
    task_name: Mapped[str] = mapped_column(String(200))
    queue: Mapped[str | None] = mapped_column(String(200))
    args: Mapped[list[Any]] = mapped_column(JSON, default=list)
    kwargs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    exception_type: Mapped[str] = mapped_column(String(200))
    exception_message: Mapped[str] = mapped_column(Text)
    traceback: Mapped[str] = mapped_column(Text, default="")
    retries: Mapped[int] = mapped_column(Integer, default=0)
    failed_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    requeued_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    requeued_task_id: Mapped[str | None] = mapped_column(String(64), default=None)


MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version_shared"
