"""The audit log: one row per request a service answered or refused, whatever protocol it came by.

HTTP requests are written by :class:`shared.http.ObservedRequestMiddleware`, DIMSE messages by the ingest
receiver (``services.ingest.dimse``); both through :func:`record`, so that a row means the same whatever
wrote it: who (``principal``, ``role``; no role when the caller was not admitted), what (``method``,
``path``), on which objects (``object_uids``: never an original patient identifier), with which answer
(``status_code`` and its ``outcome``), from where (``client``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy.orm import Session, sessionmaker

from shared.db.base import session_scope
from shared.db.models import AuditEvent

log = logging.getLogger("voxelflow.audit")

OUTCOMES = ("success", "denied", "rejected", "error")


def record(
    session_factory: sessionmaker[Session],
    *,
    service: str,
    request_id: str,
    principal: str | None,
    role: str | None,
    method: str,
    path: str,
    object_uids: Sequence[str],
    status_code: int,
    outcome: str,
    client: str | None,
) -> None:
    """Write one audit row. A failure to write is logged, never raised: the audit must not turn an answer
    already given into an error after the fact."""
    if outcome not in OUTCOMES:
        raise ValueError(f"audit outcome {outcome!r} is not one of {OUTCOMES}")
    try:
        with session_scope(session_factory) as session:
            session.add(
                AuditEvent(
                    service=service,
                    request_id=request_id,
                    principal=principal,
                    role=role,
                    method=method,
                    path=path[:2048],
                    object_uids=list(dict.fromkeys(u for u in object_uids if u))[:1000],
                    status_code=status_code,
                    outcome=outcome,
                    client=client,
                )
            )
    except Exception:
        log.exception("could not write audit event", extra={"audit_request_id": request_id})


__all__ = ["OUTCOMES", "record"]
