"""Fixtures of the aggregation tests: real PostgreSQL, Redis and S3 (SeaweedFS), a real aggregator Celery
worker process, and the test-only site workers of fake_site_worker.py on the real ``training.{site}`` queues."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.aggregation import fake_site_worker as fake
from tests.service_harness import patched_environ, tokens_for_every_role, wait_for

POLL = 0.3


@pytest.fixture(scope="session")
def aggregation_env(postgres_url: str, s3_url: str, redis_url: str) -> Iterator[dict[str, str]]:
    env = {
        "VOXELFLOW_DATABASE_URL": postgres_url,
        "VOXELFLOW_STORAGE_URL": s3_url,
        "VOXELFLOW_BROKER_URL": redis_url,
        "VOXELFLOW_LOG_JSON": "false",
        "VOXELFLOW_POLL_INTERVAL_SECONDS": str(POLL),
        "VOXELFLOW_GIT_SHA": "test-sha",
        "VOXELFLOW_POLL_TASK_BUDGET_SECONDS": "3",  # short, so the tests also cross the hand-over
    }
    with patched_environ(env):
        yield env


@pytest.fixture(scope="session")
def agg_ctx(aggregation_env: dict[str, str]) -> Any:
    from services.aggregation.context import AggregationContext
    from services.aggregation.settings import AggregationSettings

    ctx = AggregationContext(AggregationSettings())
    ctx.migrate()
    return ctx


def write_manifest(store: Any, sites: dict[str, int]) -> str:
    """A dataset version built with shared.datasets: ``n`` training and one validation case per site."""
    import hashlib

    from shared.datasets.manifest import CaseRecord, DatasetManifest, compute_case_hash, save_manifest

    cases, train, val = [], [], []
    for site, n in sites.items():
        for i in range(n + 1):
            case_id = f"{site}-{i:03d}"
            image = hashlib.sha256(case_id.encode()).hexdigest()
            label = hashlib.sha256(f"{case_id}-label".encode()).hexdigest()
            cases.append(
                CaseRecord(
                    case_id=case_id,
                    patient=case_id,
                    site=site,
                    modality="MR",
                    image_key=f"cases/sha256/{image}.nii.gz",
                    label_key=f"cases/sha256/{label}.nii.gz",
                    image_sha256=image,
                    label_sha256=label,
                    case_hash=compute_case_hash(image, label),
                    source=f"msd:imagesTr/{case_id}.nii.gz",
                )
            )
            (val if i == n else train).append(case_id)
    manifest = DatasetManifest.model_validate(
        {
            "name": "aggregation-test",
            "labels": {0: "background", 1: "anterior", 2: "posterior"},
            "cases": cases,
            "splits": {"holdout": {"train": train, "val": val, "test": []}},
            "preprocessing": {"name": "test"},
            "preprocessing_hash": "a" * 64,
            "qc": {"excluded": {}},
        }
    )
    return save_manifest(store, manifest).version_id


@pytest.fixture(scope="session")
def dataset(agg_ctx: Any) -> str:
    return write_manifest(agg_ctx.store, {"site-a": 2, "site-b": 3, "site-c": 2})


@pytest.fixture(scope="session")
def initial_weights(agg_ctx: Any) -> str:
    """A tiny real network's state dict (a conv, and BatchNorm with its integer counter) as warm start."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2))
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    key = "tests/aggregation/initial.pt"
    agg_ctx.store.put_bytes(key, buffer.getvalue())
    return key


@pytest.fixture(scope="module")  # stopped after each module: in-process workers must not outlive their tests
def site_workers(aggregation_env: dict[str, str]) -> Iterator[Any]:
    """The fake training workers (one in-thread Celery worker consuming every site's queue)."""
    from tests.celery_workers import in_process_worker

    app = fake.make_app(
        aggregation_env["VOXELFLOW_BROKER_URL"],
        aggregation_env["VOXELFLOW_DATABASE_URL"],
        aggregation_env["VOXELFLOW_STORAGE_URL"],
    )
    queues = [f"training.{site}" for site in fake.SITES]
    with in_process_worker(
        app, queues=queues, perform_ping_check=False, shutdown_timeout=30, concurrency=3, pool="threads"
    ) as worker:
        yield worker


@pytest.fixture(scope="module")
def aggregator_env(aggregation_env: dict[str, str], mlflow_uri: str) -> dict[str, str]:
    """The environment of the module's aggregator process (a module overrides it for its own model name)."""
    return {**aggregation_env, "VOXELFLOW_MLFLOW_TRACKING_URI": mlflow_uri}


@dataclass
class Aggregator:
    process: Any  # tests.celery_workers.CeleryWorkerProcess
    metrics_url: str

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """One sample of the aggregator's own /metrics, as Prometheus would scrape it."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(httpx.get(self.metrics_url, timeout=10).text):
            for sample in family.samples:
                if sample.name == name and (labels is None or dict(sample.labels) == labels):
                    return float(sample.value)
        return None


@pytest.fixture(scope="module")
def aggregator(
    aggregator_env: dict[str, str], agg_ctx: Any, site_workers: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Aggregator]:
    """The real aggregator: ``celery -A services.aggregation.worker`` in its own process on the 'aggregation'
    queue, as deployed (the fake site workers are the only Celery worker inside the test process)."""
    from tests.celery_workers import CeleryWorkerProcess
    from tests.service_harness import free_port

    port = free_port()
    env = {**aggregator_env, "VOXELFLOW_METRICS_PORT": str(port)}
    log = tmp_path_factory.mktemp("aggregator") / "aggregator.log"
    process = CeleryWorkerProcess("services.aggregation.worker", "aggregation", env, log)
    process.start()
    try:
        yield Aggregator(process, f"http://127.0.0.1:{port}/metrics")
    finally:
        process.stop()


@dataclass
class Api:
    client: Any
    tokens: dict[str, str]

    def headers(self, role: str = "researcher") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def create(self, role: str = "researcher", **body: Any) -> Any:
        return self.client.post("/federated-runs", json=body, headers=self.headers(role))

    def get(self, run_id: str) -> dict[str, Any]:
        response = self.client.get(f"/federated-runs/{run_id}", headers=self.headers())
        assert response.status_code == 200, response.text
        return dict(response.json())


@pytest.fixture(scope="session")
def api(agg_ctx: Any) -> Iterator[Api]:
    from fastapi.testclient import TestClient

    from services.aggregation.main import create_app

    app = create_app()
    with TestClient(app) as client:
        yield Api(client, tokens_for_every_role(app.state.ctx.session_factory, "agg-test"))


def wait_finished(api: Api, run_id: str, timeout: float = 90.0) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        run = api.get(run_id)
        return run if run["status"] in ("succeeded", "failed", "cancelled") else None

    try:
        return dict(wait_for(done, timeout=timeout, what=f"run {run_id} to finish"))
    except BaseException:
        import faulthandler
        import sys

        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        print("objects:", list(api.client.app.state.ctx.store.list(f"federated/{run_id}/")))
        print("run state at timeout:", json.dumps(api.get(run_id), indent=1, default=str))
        raise
