"""Thin Celery tasks of the aggregation service: they take IDs and call domain code."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from shared.contracts.tasks import ADVANCE_RUN, limits


@shared_task(name=ADVANCE_RUN.name, bind=True, **limits(ADVANCE_RUN))
def advance_run_task(self: Any, run_id: str, force: bool = False) -> dict[str, Any]:
    from services.aggregation.run_orchestration import RunOrchestrator
    from services.aggregation.worker import worker_context

    ctx = worker_context()
    outcome = RunOrchestrator(ctx).advance(run_id, self.request.id, force=force)
    return {"run_id": run_id, "status": outcome.status, "round": outcome.current_round}
