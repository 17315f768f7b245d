"""Federated runs end to end through the API, the real aggregator worker and real PostgreSQL/Redis/S3.

The sites are the test-only workers of fake_site_worker.py (they stand in for the training worker so
that quorum, timeouts, failures, duplicates and late updates are tested in isolation); their updates are
deterministic, so the expected global weights can be computed independently here.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

import numpy as np
import pytest

from services.aggregation import federated_storage as fs
from tests.aggregation import fake_site_worker as fake
from tests.aggregation.conftest import Api, wait_finished

pytestmark = pytest.mark.usefixtures("aggregator")


def expected_fedavg(
    initial: dict[str, np.ndarray], rounds: int, participants: list[list[str]]
) -> dict[str, np.ndarray]:
    """Global weights after FedAvg rounds where round r averages the fake deltas of participants[r]."""
    state = {k: v.astype(np.float64) if np.issubdtype(v.dtype, np.floating) else v for k, v in initial.items()}
    for r in range(rounds):
        sites = participants[r]
        total = sum(fake.NUM_SAMPLES[s] for s in sites)
        shift = sum(fake.NUM_SAMPLES[s] / total * fake.site_delta(s, r) for s in sites)
        state = {k: v + shift if np.issubdtype(v.dtype, np.floating) else v + 1 for k, v in state.items()}
    return state


def final_weights(agg_ctx: Any, run: dict[str, Any]) -> dict[str, np.ndarray]:
    return fs.load_weights(agg_ctx.store, run["final_weights_key"])


def start(api: Api, dataset: str, initial_weights: str, behaviour: fake.Behaviour | None = None, **body: Any) -> str:
    fake.CURRENT = behaviour or fake.Behaviour()
    payload = {
        "dataset_version": dataset,
        "sites": list(fake.SITES),
        "rounds": 2,
        "local_epochs": 1,
        "evaluate": False,
        "initial_weights_key": initial_weights,
        "round_timeout_seconds": 30,
        **body,
    }
    response = api.create(**payload)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_fedavg_run_weights_progress_and_mlflow(api, agg_ctx, dataset, initial_weights, mlflow_uri):
    agg_ctx.settings.mlflow_tracking_uri = mlflow_uri  # the aggregator process has it from its environment
    try:
        run_id = start(api, dataset, initial_weights, rounds=2)
        run = wait_finished(api, run_id)
    finally:
        agg_ctx.settings.mlflow_tracking_uri = None
    assert run["status"] == "succeeded", run
    initial = fs.load_weights(agg_ctx.store, initial_weights)
    expected = expected_fedavg(initial, 2, [list(fake.SITES)] * 2)
    got = final_weights(agg_ctx, run)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    assert got["1.num_batches_tracked"].dtype == np.int64
    assert [r["status"] for r in run["round_progress"]] == ["aggregated", "aggregated"]
    for rnd in run["round_progress"]:
        assert rnd["total_samples"] == sum(fake.NUM_SAMPLES.values()) and rnd["num_updates"] == 3
        assert {s["site"]: s["state"] for s in rnd["sites"]} == dict.fromkeys(fake.SITES, "delivered")
        assert all(s["metrics"]["val_dice"] > 0 and s["update_norm"] > 0 for s in rnd["sites"])
        assert rnd["discarded"] == []
    # the contract's files: config, per-round global weights, TrainingRoundTask with the dispatched attempt id
    assert agg_ctx.store.exists(fs.config_key(run_id))
    assert all(agg_ctx.store.exists(fs.global_key(run_id, r)) for r in range(3))
    assert sorted(fake.CURRENT.calls) == sorted(
        (s, r, fs.attempt_id(run_id, r, s)) for r in range(2) for s in fake.SITES
    )

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri, registry_uri=mlflow_uri)
    mlrun = client.get_run(run["mlflow_run_id"])
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["strategy"] == "fedavg" and mlrun.data.params["dataset_version"] == dataset
    assert mlrun.data.params["plan_fields"] == "none"  # this version has no stored fingerprint
    assert mlrun.data.tags["git_sha"] == "test-sha" and mlrun.data.tags["preprocessing_hash"] == "a" * 64
    history = client.get_metric_history(mlrun.info.run_id, "site/site-b/num_samples")
    assert [(m.step, m.value) for m in history] == [(0, 30.0), (1, 30.0)]
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert {"curves.png", "history.json", "model"} <= artifacts
    version = client.get_model_version(run["model_name"], run["model_version"])
    assert version.tags["federated_run_id"] == run_id and version.tags["dataset_version"] == dataset
    assert version.run_id == mlrun.info.run_id


def test_a_failing_site_is_reported_and_the_quorum_carries_the_run(api, agg_ctx, dataset, initial_weights):
    behaviour = fake.Behaviour(fail={("site-c", None)})
    run_id = start(api, dataset, initial_weights, behaviour, min_sites=2, round_timeout_seconds=60)
    run = wait_finished(api, run_id, timeout=60)
    assert run["status"] == "succeeded", run
    for rnd in run["round_progress"]:
        states = {s["site"]: s for s in rnd["sites"]}
        assert states["site-c"]["state"] == "failed"
        assert "simulated out-of-memory" in states["site-c"]["reason"]
        assert rnd["num_updates"] == 2
        # the failure is known, so the round closes at once instead of waiting for its 60 s deadline
        closed = dt.datetime.fromisoformat(rnd["closed_at"])
        assert closed < dt.datetime.fromisoformat(rnd["deadline"]) - dt.timedelta(seconds=30)
    expected = expected_fedavg(fs.load_weights(agg_ctx.store, initial_weights), 2, [["site-a", "site-b"]] * 2)
    got = final_weights(agg_ctx, run)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_without_a_quorum_the_run_fails_with_the_reason(api, aggregator, dataset, initial_weights):
    failed_before = aggregator.sample("voxelflow_aggregation_rounds_failed_total") or 0.0
    behaviour = fake.Behaviour(fail={("site-b", None), ("site-c", None)})
    run_id = start(api, dataset, initial_weights, behaviour, min_sites=2, round_timeout_seconds=60)
    run = wait_finished(api, run_id, timeout=60)
    assert run["status"] == "failed"
    # the round without quorum is counted on the aggregator's /metrics, for the alert
    assert aggregator.sample("voxelflow_aggregation_rounds_failed_total") == failed_before + 1
    # the round closes as soon as the quorum is out of reach, whether or not site-a has delivered by then
    assert re.search(r"round 0: [01] of 3 sites delivered, the quorum is 2", run["error"]), run["error"]
    assert "failed: site-b, site-c" in run["error"]
    assert run["round_progress"][0]["status"] == "failed"


def test_a_late_update_is_discarded_and_recorded(api, agg_ctx, dataset, initial_weights):
    # site-c delivers round 0 only once the aggregator has closed it (at the 12 s deadline); site-a misses
    # round 1 the same way, so round 1 is still collecting for its 12 s when site-c's late update lands
    behaviour = fake.Behaviour(after_close={("site-c", 0), ("site-a", 1)})
    run_id = start(api, dataset, initial_weights, behaviour, min_sites=2, round_timeout_seconds=12, rounds=2)
    run = wait_finished(api, run_id, timeout=120)
    assert run["status"] == "succeeded", json.dumps(run, indent=1)
    r0, r1 = run["round_progress"]
    assert {s["site"]: s["state"] for s in r0["sites"]}["site-c"] == "missing"
    assert {s["site"]: s["state"] for s in r1["sites"]}["site-a"] == "missing"
    assert r0["num_updates"] == 2 and r1["num_updates"] == 2
    # site-c's round-0 update arrived once round 0 was aggregated: discarded as late, and recorded
    late = run["round_progress"][0]["discarded"]
    assert [(d["site"], d["reason"].split(":")[0]) for d in late] == [("site-c", "late")]
    expected = expected_fedavg(
        fs.load_weights(agg_ctx.store, initial_weights), 2, [["site-a", "site-b"], ["site-b", "site-c"]]
    )
    for key, value in expected.items():
        np.testing.assert_allclose(final_weights(agg_ctx, run)[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_duplicate_updates_are_discarded_and_counted_once(api, agg_ctx, dataset, initial_weights):
    # site-b delivers twice more in round 0 (another attempt id, and a rewrite); site-c is slow, so the
    # round is still open when the duplicates arrive
    behaviour = fake.Behaviour(duplicate={("site-b", 0)}, delay={("site-c", 0): 5.0})
    run_id = start(api, dataset, initial_weights, behaviour, rounds=1)
    run = wait_finished(api, run_id, timeout=60)
    assert run["status"] == "succeeded", run
    r0 = run["round_progress"][0]
    reasons = sorted((d["attempt_id"], d["reason"].split(":")[0]) for d in r0["discarded"])
    attempt = fs.attempt_id(run_id, 0, "site-b")
    assert reasons == [(attempt, "duplicate"), (attempt + "-retry", "duplicate")]
    assert r0["num_updates"] == 3 and r0["total_samples"] == 60
    expected = expected_fedavg(fs.load_weights(agg_ctx.store, initial_weights), 1, [list(fake.SITES)])
    for key, value in expected.items():
        np.testing.assert_allclose(final_weights(agg_ctx, run)[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_dp_noise_is_fresh_per_run_and_not_derivable_from_the_run(api, agg_ctx, dataset, initial_weights):
    """Two runs with the same seed, sites and updates differ only by their DP noise: it comes from the OS
    CSPRNG, not from run.seed, and no field of the run's API response can regenerate it."""
    from services.aggregation.privacy import add_gaussian_noise

    privacy = {"clip_norm": 0.05, "noise_multiplier": 1.1, "delta": 1e-5}
    runs = []
    for _ in range(2):
        run_id = start(api, dataset, initial_weights, privacy=privacy, rounds=1, seed=11)
        runs.append(wait_finished(api, run_id))
    assert all(r["status"] == "succeeded" for r in runs), runs
    a, b = final_weights(agg_ctx, runs[0]), final_weights(agg_ctx, runs[1])
    float_keys = [k for k in a if np.issubdtype(a[k].dtype, np.floating)]
    assert float_keys and all(not np.array_equal(a[k], b[k]) for k in float_keys)
    # the same run without noise: the difference to it is the noise actually added
    clean = final_weights(agg_ctx, wait_finished(api, start(api, dataset, initial_weights, rounds=1, seed=11)))
    std = runs[0]["round_progress"][0]["noise_std"]
    # no integer in the response (seed, counts, ...) seeds a generator that reproduces that noise
    candidates = {v for v in _walk(runs[0]) if isinstance(v, int) and not isinstance(v, bool) and v >= 0}
    assert 11 in candidates
    key = float_keys[0]
    for candidate in candidates:
        regenerated = add_gaussian_noise({k: np.zeros_like(a[k]) for k in a}, std, np.random.default_rng(candidate))
        assert not np.allclose(a[key] - clean[key], regenerated[key], atol=std * 1e-3)


def _walk(value: Any) -> Any:
    if isinstance(value, dict):
        for item in value.values():
            yield from _walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item)
    else:
        yield value


def test_fedadam_with_privacy_reports_epsilon_per_round(api, agg_ctx, aggregator, dataset, initial_weights):
    from services.aggregation.privacy import epsilon_after

    privacy = {"clip_norm": 0.05, "noise_multiplier": 1.1, "delta": 1e-5}
    behaviour = fake.Behaviour(ignore_clip={("site-c", None)})
    run_id = start(api, dataset, initial_weights, behaviour, strategy="fedadam", privacy=privacy, rounds=2)
    run = wait_finished(api, run_id)
    assert run["status"] == "succeeded", run
    eps = [r["epsilon"] for r in run["round_progress"]]
    assert eps == pytest.approx([epsilon_after(1, 1.1, 1e-5), epsilon_after(2, 1.1, 1e-5)])
    assert run["epsilon"] == pytest.approx(eps[-1]) and eps[0] < eps[1]
    exported = aggregator.sample("voxelflow_aggregation_privacy_epsilon", {"run_id": run_id})
    assert exported == pytest.approx(eps[-1])
    assert (aggregator.sample("voxelflow_aggregation_round_duration_seconds_count") or 0) >= 2
    assert all(r["noise_std"] == pytest.approx(1.1 * 0.05 * 30 / 60) for r in run["round_progress"])
    assert agg_ctx.store.exists(fs.server_state_key(run_id, 2))
    # the raw updates are far larger than the bound: sites a and b clipped theirs as the task asked (what
    # the aggregator received has norm C); site-c ignored it, so the aggregator saw (and clipped) more
    for rnd in run["round_progress"]:
        norms = {s["site"]: s["update_norm"] for s in rnd["sites"]}
        assert norms["site-a"] == pytest.approx(0.05, rel=1e-4) and norms["site-b"] == pytest.approx(0.05, rel=1e-4)
        assert norms["site-c"] > 0.05
