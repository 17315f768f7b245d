"""Federated training end to end with REAL site workers: two ``services.training_worker.worker`` processes
(queues training.hosp-x / training.hosp-y) train a tiny U-Net on real hippocampus cases from the
preprocessed cache, the real aggregator (services.aggregation.worker) runs FedAvg, scores the global model
on each site's holdout.val after every round and on holdout.test at the end, and registers a version in a
real MLflow server with the lineage and per-case Dice the promotion gate needs. Nothing is faked."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.aggregation.conftest import wait_finished
from tests.celery_workers import CeleryWorkerProcess

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "e2e-federated"
SITES = ("hosp-x", "hosp-y")  # not the fake workers' site names: their queues are ours alone
PARTS = {
    "hosp-x": {
        "train": ["hippocampus_004", "hippocampus_006", "hippocampus_007", "hippocampus_017"],
        "val": ["hippocampus_019"],
        "test": ["hippocampus_026"],
    },
    "hosp-y": {
        "train": ["hippocampus_033", "hippocampus_034", "hippocampus_008", "hippocampus_014"],
        "val": ["hippocampus_015"],
        "test": ["hippocampus_020"],
    },
}
TINY = {
    "network": {"name": "unet", "args": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0}},
    "epochs": 1,
    "batch_size": 2,
    "patch": {"sampler": "pos_neg", "size": [32, 32, 32], "num_samples": 1},
    "validation": {"roi_size": [48, 64, 48]},
    "seed": 3,
}


@pytest.fixture(scope="module")
def hippo_version(agg_ctx: Any, hippocampus_dir: Path) -> str:
    from tests.training.datasets import write_split_dataset

    return write_split_dataset(agg_ctx.store, hippocampus_dir, PARTS, name="e2e-federated")


@pytest.fixture(scope="module")
def training_workers(
    aggregation_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[CeleryWorkerProcess]]:
    workers = []
    logs = tmp_path_factory.mktemp("site-workers")
    try:
        for site in SITES:
            env = {
                **aggregation_env,
                "VOXELFLOW_SITE": site,
                "VOXELFLOW_TORCH_THREADS": "1",
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(REPO),
            }
            worker = CeleryWorkerProcess(
                "services.training_worker.worker", f"training.{site}", env, logs / f"{site}.log"
            )
            worker.start()
            workers.append(worker)
        yield workers
    finally:
        for worker in workers:
            worker.stop()


@pytest.fixture(scope="module")
def aggregator_env(aggregation_env: dict[str, str], mlflow_uri: str) -> dict[str, str]:
    """This module's aggregator registers under its own model name (its candidate alias is ours alone)."""
    return {
        **aggregation_env,
        "VOXELFLOW_MLFLOW_TRACKING_URI": mlflow_uri,
        "VOXELFLOW_REGISTERED_MODEL_NAME": MODEL_NAME,
    }


def test_fedavg_with_real_site_workers_registers_an_evaluated_version(
    api, agg_ctx, aggregator, hippo_version, training_workers, mlflow_uri
):
    from mlflow import MlflowClient

    from shared.registry import per_case_dice

    model_name = MODEL_NAME
    agg_ctx.settings.mlflow_tracking_uri = mlflow_uri  # the aggregator process has both from its environment
    agg_ctx.settings.registered_model_name = model_name
    try:
        response = api.create(
            dataset_version=hippo_version,
            sites=list(SITES),
            rounds=2,
            local_epochs=1,
            strategy="fedavg",
            training_config=TINY,
            round_timeout_seconds=240,
        )  # evaluate is on by default
        assert response.status_code == 201, response.text
        run = wait_finished(api, response.json()["id"], timeout=240)
    finally:
        agg_ctx.settings.mlflow_tracking_uri = None
        agg_ctx.settings.registered_model_name = "voxelflow-segmentation"
    logs = "\n".join(w.log() for w in training_workers)
    assert run["status"] == "succeeded", (run.get("error"), logs)
    assert [r["round"] for r in run["round_progress"]] == [0, 1]
    for rnd in run["round_progress"]:
        assert rnd["num_updates"] == 2 and rnd["total_samples"] == 8  # 4 training volumes per site
        for site in rnd["sites"]:
            assert site["state"] == "delivered"
            assert {"train_loss", "val_dice"} <= set(site["metrics"])  # the site's own local validation
        metrics = rnd["metrics"]
        assert set(metrics["val_dice"]) == set(SITES)
        for site in SITES:
            assert 0.0 <= metrics["val_dice"][site] <= 1.0
            assert metrics["sites"][site]["val_cases"] == 1.0
            assert {"val_dice_anterior", "val_dice_posterior"} <= set(metrics["sites"][site])
        pooled = sum(metrics["val_dice"].values()) / 2  # one val case per site: pooled = mean of sites
        assert metrics["val_dice_mean"] == pytest.approx(pooled)
    # the sites went on with their own optimiser state (on by default) over one schedule of 2 x 1 epochs
    assert [[s["metrics"]["carried_from_round"] for s in r["sites"]] for r in run["round_progress"]] == [
        [-1.0, -1.0],
        [0.0, 0.0],
    ]
    assert [r["sites"][0]["metrics"]["schedule_offset"] for r in run["round_progress"]] == [0.0, 1.0]
    best = max(range(2), key=lambda r: (run["round_progress"][r]["metrics"]["val_dice_mean"], -r))
    assert run["best_round"] == best and run["final_weights_key"].endswith(f"round-{best + 1:04d}/global.pt")

    client = MlflowClient(mlflow_uri, registry_uri=mlflow_uri)
    version = client.get_model_version(model_name, run["model_version"])
    assert client.get_model_version_by_alias(model_name, "candidate").version == version.version
    tags = version.tags
    assert tags["federated_run_id"] == run["id"] and tags["strategy"] == "fedavg"
    assert tags["dataset_version"] == hippo_version and tags["git_sha"] == "test-sha"
    from shared.datasets import load_manifest

    assert tags["preprocessing_hash"] == load_manifest(agg_ctx.store, hippo_version).preprocessing_hash
    per_case = per_case_dice(version, client)
    assert per_case is not None and set(per_case) == {"hippocampus_026", "hippocampus_020"}
    assert float(tags["test_dice"]) == pytest.approx(sum(per_case.values()) / 2, abs=1e-5)
    # one test case per site: each site's test Dice is its case's, the pooled one their mean
    sites_test = {site: run["test_metrics"]["sites"][site]["dice_mean"] for site in SITES}
    assert sites_test == pytest.approx({"hosp-x": per_case["hippocampus_026"], "hosp-y": per_case["hippocampus_020"]})
    assert run["test_metrics"]["pooled"]["dice_mean"] == pytest.approx(float(tags["test_dice"]), abs=1e-5)
    mlrun = client.get_run(run["mlflow_run_id"])
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.metrics["test/dice_mean"] == pytest.approx(float(tags["test_dice"]), abs=1e-5)
    assert "test/anterior/dice_ci_high" in mlrun.data.metrics
    history = client.get_metric_history(run["mlflow_run_id"], "global/val_dice")
    assert sorted(m.step for m in history) == [0, 1]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [
        r["metrics"]["val_dice_mean"] for r in run["round_progress"]
    ]
    assert client.get_metric_history(run["mlflow_run_id"], "global/hosp-x/val_dice")
    # the model registered is the final global model and loads as any registered version does
    from shared.registry import load_model

    loaded = load_model(f"models:/{model_name}/{version.version}", client)
    assert loaded.labels == {0: "bg", 1: "anterior", 2: "posterior"}
