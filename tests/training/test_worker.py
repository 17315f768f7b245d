"""The training worker end to end: real Redis broker, real S3 (SeaweedFS), real PostgreSQL (dead letters),
and a real ``celery worker`` subprocess that is SIGKILLed mid-round and restarted."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult

from shared.storage import open_object_store
from shared.training import build_network, load_config
from shared.training.state import state_from_bytes, state_to_bytes
from tests.celery_workers import CeleryWorkerProcess
from tests.training.datasets import CASE_IDS, SITE, write_dataset

REPO = Path(__file__).resolve().parents[2]
RUN = "run-test"


@pytest.fixture(scope="module")
def version(s3_url: str, hippocampus_dir: Path) -> str:
    return write_dataset(open_object_store(s3_url), hippocampus_dir, CASE_IDS)


@pytest.fixture(scope="module")
def worker_env(postgres_url: str, s3_url: str, redis_url: str, version: str) -> dict[str, str]:
    store = open_object_store(s3_url)
    config = load_config("hippocampus_unet").model_copy(update={"epochs": 6})
    store.put_bytes(f"federated/{RUN}/training-config.yaml", config.to_yaml().encode())
    import torch

    torch.manual_seed(7)
    store.put_bytes(f"federated/{RUN}/round-0001/global.pt", state_to_bytes(build_network(config, 1, 3).state_dict()))
    return {
        **os.environ,
        "VOXELFLOW_DATABASE_URL": postgres_url,
        "VOXELFLOW_STORAGE_URL": s3_url,
        "VOXELFLOW_BROKER_URL": redis_url,
        "VOXELFLOW_SITE": SITE,
        "VOXELFLOW_LOG_JSON": "false",
        "VOXELFLOW_TORCH_THREADS": "1",
        # short, so that the message of the killed worker comes back within the test
        "VOXELFLOW_VISIBILITY_TIMEOUT_SECONDS": "3",
        "PYTHONPATH": str(REPO),
    }


@pytest.fixture(scope="module")
def worker(worker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[CeleryWorkerProcess]:
    process = CeleryWorkerProcess(
        "services.training_worker.worker",
        f"training.{SITE}",
        worker_env,
        tmp_path_factory.mktemp("worker") / "worker.log",
    )
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(worker_env: dict[str, str]) -> Any:
    from shared.tasks import create_celery_app

    return create_celery_app(
        "training-worker", worker_env["VOXELFLOW_BROKER_URL"], worker_env["VOXELFLOW_DATABASE_URL"]
    )


def round_message(version: str, **overrides: Any) -> dict[str, Any]:
    return {
        "run_id": RUN,
        "round": 1,
        "site": SITE,
        "dataset_version_id": version,
        "global_weights_uri": f"federated/{RUN}/round-0001/global.pt",
        "training_config_uri": f"federated/{RUN}/training-config.yaml",
        "local_epochs": 6,
        "fedprox_mu": 0.0,
        "task_attempt_id": "attempt-1",
        **overrides,
    }


def send(client: Any, message: dict[str, Any]) -> AsyncResult:
    return client.send_task("training.train_round", args=[message], queue=f"training.{SITE}")


def wait(predicate: Any, timeout: float, what: str, worker: CeleryWorkerProcess) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}; worker log:\n{worker.log()}")


def test_killed_worker_resumes_from_checkpoint_and_delivers_once(
    worker: CeleryWorkerProcess, worker_env: dict[str, str], client: Any, version: str
) -> None:
    store = open_object_store(worker_env["VOXELFLOW_STORAGE_URL"])
    prefix = f"federated/{RUN}/round-0001/{SITE}/attempt-1/"
    checkpoint = f"site-private/{SITE}/federated/{RUN}/round-0001/attempt-1/checkpoint.pt"
    result = send(client, round_message(version))
    # progress arrives through the Celery task state, the checkpoint through object storage
    wait(lambda: result.state == "PROGRESS" and store.exists(checkpoint), 180, "first epoch", worker)
    worker.kill()
    assert not store.exists(prefix + "update.json"), "the round finished before the kill: the test proves nothing"
    progress = result.info
    assert progress["epoch"] >= 1 and progress["loss"] > 0 and 0 <= progress["val_dice"] <= 1

    worker.start()  # the unacknowledged message is redelivered after the visibility timeout
    update = result.get(timeout=240)
    assert update["site"] == SITE and update["task_attempt_id"] == "attempt-1"
    assert update["num_samples"] == "3" or update["num_samples"] == 3  # int64 is a string in proto JSON
    assert update["metrics"]["resumed_from_epoch"] >= 1, "the redelivered task trained from scratch"
    assert update["metrics"]["epochs"] == 6
    keys = sorted(store.list(prefix))
    assert keys == [prefix + "update.json", prefix + "weights.pt"]  # the checkpoint is site-private
    assert store.exists(checkpoint)
    assert json.loads(store.get_bytes(prefix + "update.json")) == update
    weights = state_from_bytes(store.get_bytes(update["weights_uri"]))
    assert set(weights) == set(build_network(load_config("hippocampus_unet"), 1, 3).state_dict())

    # the same attempt again (a duplicate delivery): the delivered update comes back, nothing is retrained
    etag = store.stat(prefix + "weights.pt").etag
    assert send(client, round_message(version)).get(timeout=60) == update
    assert store.stat(prefix + "weights.pt").etag == etag
    assert "resuming" in worker.log()


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"site": "site-b", "task_attempt_id": "wrong-site"}, "reached the worker of site 'site-a'"),
        ({"dataset_version_id": "ds-unknown", "task_attempt_id": "bad-ds"}, "unknown dataset version"),
        ({"global_weights_uri": "federated/nope.pt", "task_attempt_id": "no-weights"}, "does not exist"),
        ({"dp_clip_norm": -1.0, "task_attempt_id": "negative-clip"}, "or a positive number, got -1.0"),
    ],
)
def test_bad_round_tasks_fail_permanently_with_a_dead_letter(
    worker: CeleryWorkerProcess, worker_env: dict[str, str], client: Any, version: str, overrides: dict, reason: str
) -> None:
    from sqlalchemy import select

    from shared.db.base import make_engine, make_session_factory, session_scope
    from shared.db.models import DeadLetter

    result = send(client, round_message(version, **overrides))
    with pytest.raises(Exception, match=reason):
        result.get(timeout=120)
    factory = make_session_factory(make_engine(worker_env["VOXELFLOW_DATABASE_URL"]))

    def dead_letter() -> Any:
        with session_scope(factory) as session:
            row = session.scalar(select(DeadLetter).where(DeadLetter.task_id == result.id))
            return (row.exception_type, row.exception_message, row.retries) if row else None

    exc_type, message, retries = wait(dead_letter, 30, "dead letter", worker)
    assert exc_type == "PermanentTaskError" and reason in message and retries == 0


def test_a_private_round_clips_the_update_at_the_site(
    worker: CeleryWorkerProcess, worker_env: dict[str, str], client: Any, version: str
) -> None:
    """With dp_clip_norm in the task, what leaves the site is global + an update of norm at most C."""
    from shared.privacy import update_norm

    store = open_object_store(worker_env["VOXELFLOW_STORAGE_URL"])
    bound = 0.01
    update = send(client, round_message(version, local_epochs=1, dp_clip_norm=bound, task_attempt_id="dp-1")).get(
        timeout=240
    )
    assert update["clip_norm"] == bound
    arrays = {k: v.numpy() for k, v in state_from_bytes(store.get_bytes(update["weights_uri"])).items()}
    start = {
        k: v.numpy() for k, v in state_from_bytes(store.get_bytes(round_message(version)["global_weights_uri"])).items()
    }
    # one epoch of AdamW moves the weights far more than 0.01 in L2: the bound is what limits it here
    assert update_norm(start, arrays) == pytest.approx(bound, rel=1e-3)


def test_a_round_that_was_aggregated_before_the_task_started_is_not_trained(
    worker: CeleryWorkerProcess, worker_env: dict[str, str], client: Any, version: str
) -> None:
    """A straggler's task (its queue was backed up) would only produce a late update: it is skipped."""
    store = open_object_store(worker_env["VOXELFLOW_STORAGE_URL"])
    global_weights = store.get_bytes(round_message(version)["global_weights_uri"])
    store.put_bytes(f"federated/{RUN}/round-0006/global.pt", global_weights)  # round 5 is aggregated
    task = round_message(version, round=5, task_attempt_id="straggler")
    result = send(client, task).get(timeout=60)
    assert "was aggregated before this task started" in result["skipped"]
    assert list(store.list(f"federated/{RUN}/round-0005/{SITE}/")) == []


CARRY_RUN = "run-carry"
#: a tiny U-Net with BatchNorm (the default instance norm has no parameters for FedBN to keep)
CARRY_CONFIG = {
    "network": {"name": "unet", "args": {"channels": [4, 8], "strides": [2], "num_res_units": 0, "norm": "batch"}},
    "optimizer": {"name": "adamw", "lr": 0.004},
    "schedule": {"name": "poly", "warmup_epochs": 1},
    "patch": {"sampler": "pos_neg", "size": [32, 32, 32], "num_samples": 1},
    "epochs": 1,
    "seed": 11,
}


def test_the_site_carries_its_optimiser_state_and_norm_layers_to_its_next_round_privately(
    worker: CeleryWorkerProcess, worker_env: dict[str, str], client: Any, version: str
) -> None:
    """Round 0, then round 2 (the site missed round 1): round 2 starts from round 0's Adam moments and the
    site's own BatchNorm layers, kept under site-private/ and never under the aggregator's federated/ keys.
    The test recomputes round 2 with train_local in this process: bit-identical only with exactly that
    state, and different with a fresh optimiser."""
    import torch

    from shared.training import TrainingConfig, train_local
    from shared.training.data import load_site_data
    from shared.training.federated import config_norm_keys

    store = open_object_store(worker_env["VOXELFLOW_STORAGE_URL"])
    config = TrainingConfig.model_validate(CARRY_CONFIG)
    store.put_bytes(f"federated/{CARRY_RUN}/training-config.yaml", config.to_yaml().encode())
    torch.manual_seed(0)
    store.put_bytes(
        f"federated/{CARRY_RUN}/round-0000/global.pt", state_to_bytes(build_network(config, 1, 3).state_dict())
    )

    def task(round_index: int) -> dict[str, Any]:
        return round_message(
            version,
            run_id=CARRY_RUN,
            round=round_index,
            global_weights_uri=f"federated/{CARRY_RUN}/round-{round_index:04d}/global.pt",
            training_config_uri=f"federated/{CARRY_RUN}/training-config.yaml",
            local_epochs=1,
            task_attempt_id=f"carry-r{round_index}",
            schedule_offset=round_index,
            schedule_total=3,
            keep_optimizer_state=True,
            local_norm_layers=True,
        )

    first = send(client, task(0)).get(timeout=180)
    assert first["metrics"]["carried_from_round"] == -1.0
    site_state = state_from_bytes(
        store.get_bytes(f"site-private/{SITE}/federated/{CARRY_RUN}/round-0000/site-state.pt")
    )
    norm_keys = config_norm_keys(config)
    assert norm_keys and set(site_state["norm"]) == norm_keys
    assert site_state["optimizer"]["state"], "no Adam moments were kept"

    # the "aggregator": round 2's global model has other norm layers than the site's (e.g. averaged ones)
    delivered = state_from_bytes(store.get_bytes(first["weights_uri"]))
    global_2 = {
        k: (torch.full_like(v, 0.5) if k in norm_keys and v.is_floating_point() else v) for k, v in delivered.items()
    }
    store.put_bytes(f"federated/{CARRY_RUN}/round-0002/global.pt", state_to_bytes(global_2))
    second = send(client, task(2)).get(timeout=180)
    assert second["metrics"]["carried_from_round"] == 0.0 and second["metrics"]["schedule_offset"] == 2.0
    got = state_from_bytes(store.get_bytes(second["weights_uri"]))

    data = load_site_data(store, version, SITE)
    start = {**global_2, **site_state["norm"]}
    kwargs: dict[str, Any] = {"augment": data.augment, "epochs": 1, "schedule_offset": 2, "schedule_total": 3}
    expected = train_local(config, data.train, data.val, start, optimizer_state=site_state["optimizer"], **kwargs)
    for key, value in expected.state_dict.items():
        assert torch.equal(value, got[key]), key
    fresh = train_local(config, data.train, data.val, start, **kwargs)
    assert any(not torch.equal(fresh.state_dict[k], got[k]) for k in got), "a fresh optimiser gave the same weights"

    # nothing under the aggregator's prefix holds optimiser state: only the contract's weights and updates
    for key in store.list(f"federated/{CARRY_RUN}/"):
        assert key.endswith(("global.pt", "training-config.yaml", "weights.pt", "update.json")), key
        if key.endswith(".pt"):
            assert set(state_from_bytes(store.get_bytes(key))) == set(delivered), key
    assert sorted(store.list(f"site-private/{SITE}/federated/{CARRY_RUN}/")) == [
        f"site-private/{SITE}/federated/{CARRY_RUN}/round-0000/carry-r0/checkpoint.pt",
        f"site-private/{SITE}/federated/{CARRY_RUN}/round-0000/site-state.pt",
        f"site-private/{SITE}/federated/{CARRY_RUN}/round-0002/carry-r2/checkpoint.pt",
        f"site-private/{SITE}/federated/{CARRY_RUN}/round-0002/site-state.pt",
    ]
