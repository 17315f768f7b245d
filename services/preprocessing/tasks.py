"""Thin Celery tasks of the preprocessing service: they take IDs (or, from ingest, its message) and call domain code.

All are idempotent: cases are upserted by source, versions are content-addressed, preprocessed cases are
keyed by (case hash, pipeline hash). Bad input raises PermanentTaskError (dead letter, no retry).
"""

from __future__ import annotations

from typing import Any

from celery import shared_task

from shared.contracts.tasks import BUILD_DATASET, PRECOMPUTE, SERIES_READY, limits
from shared.tasks import PermanentTaskError


def _context() -> Any:
    from services.preprocessing.worker import worker_context

    return worker_context()


@shared_task(name=SERIES_READY.name, bind=True, **limits(SERIES_READY))
def series_ready_task(self: Any, message: dict[str, Any]) -> str:
    from services.preprocessing.case_files import CaseFileError
    from services.preprocessing.catalogue_cases import SeriesMessageError, record_series

    ctx = _context()
    try:
        return record_series(ctx.store, ctx.session_factory, message, ctx.settings.catalogue_collection)
    except (SeriesMessageError, CaseFileError) as exc:
        raise PermanentTaskError(str(exc)) from exc


@shared_task(name=BUILD_DATASET.name, bind=True, **limits(BUILD_DATASET))
def build_dataset_task(self: Any, build_id: str) -> str:
    from services.preprocessing.dataset_builder import BuildError, build_version
    from services.preprocessing.sites import SiteAssignmentError
    from services.preprocessing.splits import SplitError
    from shared.datasets import ManifestError
    from shared.preprocessing import SpecError

    ctx = _context()
    try:
        return build_version(ctx.store, ctx.session_factory, build_id, ctx.settings.default_spec)
    except (BuildError, SiteAssignmentError, SplitError, ManifestError, SpecError, ValueError) as exc:
        raise PermanentTaskError(str(exc)) from exc


@shared_task(name=PRECOMPUTE.name, bind=True, **limits(PRECOMPUTE))
def precompute_task(self: Any, job_id: str) -> dict[str, int]:
    from services.preprocessing.precompute import run_precompute

    ctx = _context()
    return run_precompute(ctx.store, ctx.session_factory, job_id)
