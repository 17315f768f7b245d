"""An aggregator worker process killed with SIGKILL inside a round resumes when a new one starts (FedAdam with
persisted server moments, and differential-privacy noise, so that every piece of round state must survive
the crash). The DP noise comes from the OS CSPRNG, so two runs never share weights: what must hold is that
a round finished before the crash (its noised aggregate and server moments persisted) is not redone or
re-noised on resume, and that the run ends with each site trained once per round and the same ε."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from services.aggregation import federated_storage as fs
from services.aggregation.models import FederatedRound
from tests.aggregation import fake_site_worker as fake
from tests.aggregation.conftest import wait_finished
from tests.service_harness import wait_for

REPO = Path(__file__).resolve().parents[2]
QUEUE = "aggregation-resume-test"


def start_aggregator(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "services.aggregation.worker",
            "worker",
            "-Q",
            QUEUE,
            "-P",
            "solo",
            "--loglevel",
            "INFO",
            "--without-heartbeat",
            "--without-mingle",
            "--without-gossip",
        ],
        cwd=REPO,
        env={**os.environ, **env, "VOXELFLOW_AGGREGATION_QUEUE": QUEUE},
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


@pytest.fixture
def resume_api(aggregation_env: dict[str, str], site_workers: Any) -> Any:
    """An API whose runs go to the subprocess aggregator's own queue (not the in-thread one)."""
    from fastapi.testclient import TestClient

    from services.aggregation.main import create_app
    from services.aggregation.settings import AggregationSettings
    from shared.auth import Role, create_token
    from shared.db.base import session_scope
    from tests.aggregation.conftest import Api

    app = create_app(AggregationSettings(aggregation_queue=QUEUE))
    with TestClient(app) as client:
        with session_scope(app.state.ctx.session_factory) as session:
            token = create_token(session, f"resume-test-{os.getpid()}-{id(app)}", Role.RESEARCHER)
        yield Api(client, {"researcher": token}), app.state.ctx


def test_killed_aggregator_resumes_with_the_same_weights(
    resume_api, aggregation_env, dataset, initial_weights, tmp_path
):
    api, ctx = resume_api
    body = {
        "dataset_version": dataset,
        "sites": list(fake.SITES),
        "rounds": 3,
        "strategy": "fedadam",
        "server_optimizer": {"lr": 0.05},
        "privacy": {"clip_norm": 0.05, "noise_multiplier": 0.8, "delta": 1e-5},
        "evaluate": False,
        "initial_weights_key": initial_weights,
        "round_timeout_seconds": 60,
        "seed": 7,
    }
    log = tmp_path / "aggregator.log"
    worker = start_aggregator(aggregation_env, log)
    try:
        fake.CURRENT = fake.Behaviour()
        reference = api.create(**body).json()["id"]
        uninterrupted = wait_finished(api, reference, timeout=120)
        assert uninterrupted["status"] == "succeeded", uninterrupted

        # the sites take a while in round 1: the aggregator is killed while it collects that round
        fake.CURRENT = fake.Behaviour(delay={(s, 1): 2.0 for s in fake.SITES})
        run_id = api.create(**body).json()["id"]

        def collecting_round_1() -> bool:
            with ctx.session_factory() as session:
                rnd = session.scalar(
                    select(FederatedRound).where(FederatedRound.run_id == run_id, FederatedRound.round == 1)
                )
                return rnd is not None and rnd.dispatched and rnd.status == "collecting"

        wait_for(collecting_round_1, timeout=60, interval=0.05, what="round 1 to be collecting")
        # round 0 is finished: its noised aggregate and the server moments are persisted
        round_0_global = fs.load_weights(ctx.store, fs.global_key(run_id, 1))
        round_0_moments = fs.load_server_state(ctx.store, fs.server_state_key(run_id, 1))
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
        assert api.get(run_id)["status"] == "running"
        # the updates of round 1 arrive while no aggregator runs
        wait_for(lambda: len(fake.CURRENT.calls) >= 6, timeout=30, what="round-1 site tasks")

        worker = start_aggregator(aggregation_env, log)
        resumed = wait_finished(api, run_id, timeout=120)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
    assert resumed["status"] == "succeeded", (resumed, log.read_text()[-3000:])
    assert [r["round"] for r in resumed["round_progress"]] == [0, 1, 2]
    assert all(r["num_updates"] == 3 and r["discarded"] == [] for r in resumed["round_progress"])
    # each site trained each round exactly once: no re-dispatch produced a second attempt
    assert sorted(fake.CURRENT.calls) == sorted({c for c in fake.CURRENT.calls})
    assert resumed["epsilon"] == pytest.approx(uninterrupted["epsilon"])
    # the finished round was not re-aggregated (nor re-noised) by the resumed worker: bit-identical
    after_global = fs.load_weights(ctx.store, fs.global_key(run_id, 1))
    for key in round_0_global:
        np.testing.assert_array_equal(round_0_global[key], after_global[key], err_msg=key)
    after_moments = fs.load_server_state(ctx.store, fs.server_state_key(run_id, 1))
    assert after_moments.step == round_0_moments.step
    for before_part, after_part in ((round_0_moments.m, after_moments.m), (round_0_moments.v, after_moments.v)):
        assert set(before_part) == set(after_part)
        for key in before_part:
            np.testing.assert_array_equal(before_part[key], after_part[key], err_msg=key)
    a = fs.load_weights(ctx.store, uninterrupted["final_weights_key"])
    b = fs.load_weights(ctx.store, resumed["final_weights_key"])
    initial = fs.load_weights(ctx.store, initial_weights)
    # same seed, same updates, but fresh DP noise: the two runs' weights differ
    assert not np.array_equal(a["0.weight"], b["0.weight"])
    assert not np.allclose(b["0.weight"], initial["0.weight"])  # the run did move the model
