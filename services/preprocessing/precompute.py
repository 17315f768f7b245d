"""Preprocess a version's cases into ``preprocessed/{pipeline_hash}/{case_hash}.pt`` (shared.datasets cache).

The cache key is (case content, pipeline definition), so a rerun, a redelivered task or another version
sharing the cases costs one existence check per case. One failing case is recorded and never stops the rest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from services.preprocessing import metrics
from services.preprocessing.models import PrecomputeJob
from shared.datasets import load_manifest, preprocess_cases
from shared.db.base import session_scope, utcnow
from shared.preprocessing import PreprocessingSpec
from shared.storage import ObjectStore
from shared.tasks import PermanentTaskError


@dataclass(frozen=True)
class JobRequest:
    """What the API recorded in the job's row: the task reads it by ID instead of carrying it."""

    job_id: str
    version_id: str
    pipeline_hash: str
    case_ids: tuple[str, ...]


def load_job(session_factory: sessionmaker[Session], job_id: str) -> JobRequest:
    with session_scope(session_factory) as session:
        row = session.get(PrecomputeJob, job_id)
        if row is None:
            raise PermanentTaskError(f"no precompute job {job_id!r}")
        return JobRequest(row.id, row.version_id, row.pipeline_hash, tuple(row.case_ids or ()))


def run_precompute(store: ObjectStore, session_factory: sessionmaker[Session], job_id: str) -> dict[str, int]:
    job = load_job(session_factory, job_id)
    try:
        manifest = load_manifest(store, job.version_id)
    except KeyError as exc:
        raise PermanentTaskError(str(exc)) from exc
    spec = PreprocessingSpec.from_dict(manifest.preprocessing)
    if job.pipeline_hash and job.pipeline_hash != spec.hash:
        raise PermanentTaskError(f"job pipeline {job.pipeline_hash} is not the version's ({spec.hash})")
    wanted = set(job.case_ids)
    cases = [c for c in manifest.cases if not wanted or c.case_id in wanted]
    unknown = sorted(wanted - {c.case_id for c in cases})
    if unknown:
        raise PermanentTaskError(f"cases not in {manifest.version_id}: {unknown[:10]}")
    with session_scope(session_factory) as session:
        row = session.get(PrecomputeJob, job.job_id)
        if row is not None:
            row.status, row.total = "running", len(cases)
    last = time.perf_counter()

    def progress(done: int, total: int, case_id: str, outcome: str) -> None:
        nonlocal last
        now = time.perf_counter()
        if outcome == "failed":
            metrics.cases_failed_total.labels("preprocess").inc()
        else:
            metrics.cases_processed_total.labels("preprocess", "computed" if outcome == "built" else "cached").inc()
            if outcome == "built":
                metrics.case_seconds.labels("preprocess").observe(now - last)
        last = now

    result = preprocess_cases(store, cases, spec, progress)
    summary = {"total": len(cases), "computed": result.built, "cached": result.cached, "failed": len(result.failed)}
    with session_scope(session_factory) as session:
        row = session.get(PrecomputeJob, job.job_id)
        if row is not None:
            row.status = "done" if not result.failed else "failed"
            row.computed, row.cached, row.failed = result.built, result.cached, len(result.failed)
            row.errors = dict(result.failed)
            row.finished_at = utcnow()
    return summary
