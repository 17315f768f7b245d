"""Federated runs that keep their progress, through the API and the real aggregator worker (real PostgreSQL,
Redis, S3, MLflow): what the round tasks tell the sites (the schedule over the whole run, optimiser state,
FedBN), FedBN's server step, and stopping / the registered round / the test Dice per site following the
global validation Dice. The sites are fake_site_worker.py's (deterministic updates, or given weights), so
the expected weights and the expected choice follow from the updates alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.aggregation import federated_storage as fs
from tests.aggregation import fake_site_worker as fake
from tests.aggregation.conftest import wait_finished

pytestmark = pytest.mark.usefixtures("aggregator")

BATCH_NORM_NET = {"name": "unet", "args": {"channels": [2, 4], "strides": [2], "num_res_units": 0, "norm": "batch"}}
TINY_NET = {"name": "unet", "args": {"channels": [2, 4], "strides": [2], "num_res_units": 0}}
TWO_SITES = ["site-a", "site-b"]


def start(api: Any, behaviour: fake.Behaviour, **body: Any) -> str:
    fake.CURRENT = behaviour
    response = api.create(**{"round_timeout_seconds": 60, "local_epochs": 1, **body})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_fedbn_under_fedadam_keeps_norm_layers_out_of_the_server_step(api, agg_ctx, dataset):
    """Tasks carry the run-wide schedule and the site-state options; the BatchNorm entries of the global
    model are the plain weighted mean of the sites', every other entry follows FedAdam (Reddi et al. Alg. 2,
    recomputed here for the fake sites' uniform shifts), and the server moments hold no norm entry."""
    from shared.training import TrainingConfig
    from shared.training.federated import config_norm_keys

    behaviour = fake.Behaviour()
    server = {"lr": 0.05, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    run_id = start(
        api, behaviour, dataset_version=dataset, sites=list(fake.SITES), rounds=2, local_epochs=2, evaluate=False,
        strategy="fedadam", server_optimizer=server, local_norm_layers=True,
        training_config={"network": BATCH_NORM_NET},
    )  # fmt: skip
    run = wait_finished(api, run_id)
    assert run["status"] == "succeeded", run["error"]
    assert run["local_norm_layers"] is True and run["keep_optimizer_state"] is True  # the default

    tasks = sorted(behaviour.tasks, key=lambda t: (t["round"], t["site"]))
    assert [(t["round"], t["schedule_offset"], t["schedule_total"]) for t in tasks] == [
        (r, 2 * r, 4) for r in (0, 1) for _ in fake.SITES
    ]
    assert all(t["keep_optimizer_state"] and t["local_norm_layers"] for t in tasks)

    norm_keys = config_norm_keys(TrainingConfig.model_validate({"network": BATCH_NORM_NET}))
    assert norm_keys
    initial = fs.load_weights(agg_ctx.store, fs.global_key(run_id, 0))
    got = fs.load_weights(agg_ctx.store, run["final_weights_key"])
    total = sum(fake.NUM_SAMPLES.values())
    shifts = [sum(fake.NUM_SAMPLES[s] / total * fake.site_delta(s, r) for s in fake.SITES) for r in (0, 1)]
    m = v = None
    x_shift = 0.0  # FedAdam moves every non-norm float entry by the same amount (uniform pseudo-gradients)
    for shift in shifts:
        m = (1 - server["beta1"]) * shift + (server["beta1"] * m if m is not None else 0.0)
        v = (1 - server["beta2"]) * shift**2 + server["beta2"] * (v if v is not None else server["tau"] ** 2)
        x_shift += server["lr"] * m / (np.sqrt(v) + server["tau"])
    for key, value in initial.items():
        if not np.issubdtype(value.dtype, np.floating):
            np.testing.assert_array_equal(got[key], value + 2, err_msg=key)  # counters: +1 a round
        elif key in norm_keys:
            np.testing.assert_allclose(got[key], value + sum(shifts), rtol=1e-5, atol=1e-6, err_msg=key)
        else:
            np.testing.assert_allclose(got[key], value + x_shift, rtol=1e-5, atol=1e-6, err_msg=key)
    assert abs(x_shift - sum(shifts)) > 1e-3  # the two rules differ enough for the test to tell them apart
    moments = fs.load_server_state(agg_ctx.store, fs.server_state_key(run_id, 2))
    assert set(moments.m) == {k for k, a in initial.items() if np.issubdtype(a.dtype, np.floating)} - norm_keys


def test_the_options_reach_the_sites_and_optimiser_state_can_be_turned_off(api, dataset, initial_weights):
    behaviour = fake.Behaviour()
    run_id = start(
        api, behaviour, dataset_version=dataset, sites=list(fake.SITES), rounds=1, local_epochs=3, evaluate=False,
        initial_weights_key=initial_weights, keep_optimizer_state=False,
    )  # fmt: skip
    run = wait_finished(api, run_id)
    assert run["status"] == "succeeded", run["error"]
    assert {(t["keep_optimizer_state"], t["local_norm_layers"], t["schedule_total"]) for t in behaviour.tasks} == {
        (False, False, 3)
    }


# ------------------------------------------------------------------- stopping and the chosen round


PARTS = {
    "site-a": {
        "train": ["hippocampus_004"],
        "val": ["hippocampus_006"],
        "test": ["hippocampus_007", "hippocampus_017"],
    },
    "site-b": {"train": ["hippocampus_019"], "val": ["hippocampus_026"], "test": ["hippocampus_033"]},
}


@pytest.fixture(scope="module")
def cached_version(agg_ctx: Any, hippocampus_dir: Path) -> str:
    from tests.training.datasets import write_split_dataset

    return write_split_dataset(agg_ctx.store, hippocampus_dir, PARTS, name="federated-semantics")


def constant_models() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Two models of known quality: every weight 0 but the output bias (0, 1, 0), so every voxel is
    'anterior' (a small but positive Dice), and all zeros (every voxel background: Dice 0)."""
    from shared.training import TrainingConfig, build_network

    config = TrainingConfig.model_validate({"network": TINY_NET})
    state = {k: np.zeros_like(v.numpy()) for k, v in build_network(config, 1, 3).state_dict().items()}
    zeros = {k: v.copy() for k, v in state.items()}
    output_bias = [k for k, v in state.items() if k.endswith("bias") and v.shape == (3,)][-1]
    state[output_bias][:] = (0.0, 1.0, 0.0)
    return state, zeros


def test_stopping_and_the_registered_round_follow_the_global_val_dice_with_test_dice_per_site(
    api, agg_ctx, cached_version, mlflow_uri
):
    """Round 0's global model predicts 'anterior' everywhere (Dice > 0), round 1's background only (Dice 0):
    with patience 1 the run stops after round 1 of 4, registers round 0's model (not the last), and reports
    its test Dice per site and pooled, in the API and in MLflow."""
    from mlflow import MlflowClient

    anterior, zeros = constant_models()
    behaviour = fake.Behaviour(
        weights={**{(s, 0): anterior for s in TWO_SITES}, **{(s, None): zeros for s in TWO_SITES}}
    )
    agg_ctx.settings.mlflow_tracking_uri = mlflow_uri
    try:
        run_id = start(
            api, behaviour, dataset_version=cached_version, sites=TWO_SITES, rounds=4,
            training_config={"network": TINY_NET}, early_stopping={"patience": 1},
        )  # fmt: skip
        run = wait_finished(api, run_id, timeout=180)
    finally:
        agg_ctx.settings.mlflow_tracking_uri = None
    assert run["status"] == "succeeded", run["error"]
    val = [r["metrics"]["val_dice_mean"] for r in run["round_progress"]]
    assert len(val) == 2 and val[0] > 0 and val[1] == 0.0, val  # stopped after round 1 of 4
    assert run["stopped_early"] is True and run["best_round"] == 0 and run["current_round"] == 2
    assert run["final_weights_key"] == fs.global_key(run_id, 1)
    registered = fs.load_weights(agg_ctx.store, run["final_weights_key"])
    assert all(np.array_equal(registered[k], anterior[k]) for k in anterior)

    records = json.loads(agg_ctx.store.get_bytes(fs.test_evaluation_key(run_id)))["records"]
    per_case: dict[str, list[float]] = {}
    for record in records:
        per_case.setdefault(record["case_id"], []).append(record["dice"])
    case_dice = {case: float(np.mean(v)) for case, v in per_case.items()}
    assert set(case_dice) == {c for parts in PARTS.values() for c in parts["test"]}
    test = run["test_metrics"]
    assert test["pooled"]["cases"] == 3.0
    assert test["pooled"]["dice_mean"] == pytest.approx(np.mean(list(case_dice.values())))
    for site, parts in PARTS.items():
        assert test["sites"][site]["cases"] == float(len(parts["test"]))
        assert test["sites"][site]["dice_mean"] == pytest.approx(np.mean([case_dice[c] for c in parts["test"]]))
        assert test["sites"][site]["posterior/dice"] == 0.0 < test["sites"][site]["anterior/dice"]

    client = MlflowClient(mlflow_uri, registry_uri=mlflow_uri)
    metrics = client.get_run(run["mlflow_run_id"]).data.metrics
    assert metrics["test/dice_mean"] == pytest.approx(test["pooled"]["dice_mean"], abs=1e-6)
    assert metrics["test/sites/site-a/dice_mean"] == pytest.approx(test["sites"]["site-a"]["dice_mean"], abs=1e-6)
    assert metrics["federated/best_round"] == 0.0 and metrics["federated/rounds_run"] == 2.0
    version = client.get_model_version(run["model_name"], run["model_version"])
    assert version.tags["federated_round"] == "0"


def test_choose_round_and_should_stop_are_the_rules_of_the_run():
    from services.aggregation.run_orchestration import choose_round, should_stop

    assert choose_round([0.2, 0.5, 0.5, 0.4]) == 1  # the earliest of equals: fewer rounds, same score
    assert choose_round([None, 0.1]) == 1 and choose_round([None]) is None
    assert not should_stop([0.2, 0.5, 0.4], patience=2)
    assert should_stop([0.2, 0.5, 0.4, 0.45], patience=2)
    assert should_stop([0.2, 0.5, 0.505], patience=1, min_delta=0.01)  # a rise below min_delta is no gain
    assert not should_stop([0.2, 0.5, 0.52], patience=1, min_delta=0.01)
