"""The polling chain survives a broker that refuses the hand-over message: the task keeps the run, so
its retry (the same task id) goes on instead of every later message being 'superseded' by one that was
never sent."""

from __future__ import annotations

from typing import Any

import pytest
from kombu.exceptions import OperationalError

from services.aggregation.models import FederatedRun
from services.aggregation.run_orchestration import RunOrchestrator
from tests.aggregation import fake_site_worker as fake


def test_a_failed_hand_over_keeps_the_run_with_the_task_that_retries(
    api, agg_ctx, dataset, initial_weights, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = api.create(
        dataset_version=dataset,
        sites=list(fake.SITES),
        rounds=1,
        evaluate=False,
        initial_weights_key=initial_weights,
        round_timeout_seconds=600,  # no site worker runs in this module: the round keeps collecting
    )
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]

    def broker_down(*args: Any, **kwargs: Any) -> str:
        # the one simulated part: a Redis outage at the moment of the hand-over cannot be staged without
        # stopping the session's broker under every other test
        raise OperationalError("Error 111 connecting to redis: Connection refused")

    monkeypatch.setattr(agg_ctx, "kick", broker_down)
    orchestrator = RunOrchestrator(agg_ctx)
    with pytest.raises(ConnectionError, match="could not hand polling over"):  # retried by the task's policy
        orchestrator.advance(run_id, "attempt-1", force=True)
    with agg_ctx.session_factory() as session:
        assert session.get(FederatedRun, run_id).poll_task_id == "attempt-1"
    monkeypatch.undo()

    # the retry (same Celery task id) is still the run's poller and hands over normally
    outcome = orchestrator.advance(run_id, "attempt-1")
    assert outcome.status == "running" and outcome.next_poll_task_id not in (None, "attempt-1")
    assert api.client.post(f"/federated-runs/{run_id}/cancel", headers=api.headers()).status_code == 200
    with agg_ctx.celery.connection_for_write() as connection:  # the round's site tasks are nobody's business now
        for site in fake.SITES:
            connection.default_channel.queue_purge(agg_ctx.training_queue(site))
