"""Thin Celery task of the training worker: takes the round message, calls :func:`rounds.run_round`."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from shared.contracts.tasks import TRAIN_ROUND, limits


@shared_task(name=TRAIN_ROUND.name, bind=True, **limits(TRAIN_ROUND))
def train_round_task(self: Any, message: dict[str, Any]) -> dict[str, Any]:
    from services.training_worker.rounds import run_round
    from services.training_worker.worker import worker_context

    def report(meta: dict[str, Any]) -> None:
        # Celery task state PROGRESS: the aggregation service and operators follow epochs live.
        if self.request.id:
            self.update_state(state="PROGRESS", meta=meta)

    return run_round(worker_context(), message, report)
