"""The pool of candidate cases that dataset versions are built from (one row per image source)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.preprocessing.models import Case
from shared.db.base import utcnow

CASE_FIELDS = (
    "collection",
    "case_id",
    "patient",
    "site",
    "modality",
    "image_key",
    "image_sha256",
    "label_key",
    "label_sha256",
    "case_hash",
    "stats",
)


def upsert_case(session: Session, source: str, **fields: Any) -> tuple[Case, str]:
    """Insert or update the case recorded from ``source``; returns it and ``added|updated|unchanged``.

    Idempotent: the same content from the same source changes nothing, so imports and redelivered
    "series ready" messages can repeat freely.
    """
    unknown = set(fields) - set(CASE_FIELDS)
    if unknown:
        raise TypeError(f"unknown case fields {sorted(unknown)}")
    case = session.scalar(select(Case).where(Case.source == source))
    if case is None:
        case = Case(source=source, **fields)
        session.add(case)
        session.flush()
        return case, "added"
    changed = {k: v for k, v in fields.items() if getattr(case, k) != v}
    if not changed:
        return case, "unchanged"
    for key, value in changed.items():
        setattr(case, key, value)
    case.updated_at = utcnow()
    return case, "updated"


def select_cases(
    session: Session,
    collection: str | None = None,
    case_ids: Sequence[str] | None = None,
    labelled_only: bool = True,
) -> list[Case]:
    """Cases for a build: a collection, optionally narrowed to case ids; unlabelled ones only on request."""
    query = select(Case).order_by(Case.collection, Case.case_id)
    if collection is not None:
        query = query.where(Case.collection == collection)
    if case_ids:
        query = query.where(Case.case_id.in_(list(case_ids)))
    if labelled_only:
        query = query.where(Case.label_key.is_not(None))
    return list(session.scalars(query))
