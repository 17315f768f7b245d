"""Every ``voxelflow_*`` metric the dashboards and alert rules use is really exported by a running service.

Scraped from real processes on real PostgreSQL, Redis and S3: the ingest API (in-process, as the ingest
tests run it) and the ML services' Celery workers started exactly as their pods start them: through
``docker/entrypoint.sh worker`` with the variables the chart sets (``VOXELFLOW_SERVICE``,
``VOXELFLOW_CELERY_QUEUE``, ``VOXELFLOW_CELERY_POOL``, ``VOXELFLOW_METRICS_PORT``, ``VOXELFLOW_SITE``).
A round task the training worker must refuse proves that task metrics reach the scraped ``/metrics``
with the chart's pool (solo). Triton and DCGM metrics come from those components themselves and are
checked by name only (tests/deploy/test_dashboards.py).

The same processes are then scraped by a real Prometheus (tests/deploy/prometheus.py) with the jobs and
relabelling the chart's ServiceMonitors produce and the chart's alert rules loaded: targets and their labels,
rule evaluation, an alert going pending on a real counter, and every dashboard / autoscaling query run
against the scraped data."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.deploy.prometheus import (
    PrometheusServer,
    adapter_queries,
    grafana_to_promql,
    rule_groups,
    running_prometheus,
    scrape_configs,
    vector_selectors,
)
from tests.deploy.promql import base_metric_name, chart_metric_names, dashboard_expressions, dashboard_files
from tests.ingest.conftest import ingest_env, ingest_service  # noqa: F401  (fixtures)
from tests.service_harness import free_port

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
SITE = "site-live"

#: (VOXELFLOW_SERVICE, queue) of each worker started like its pod
WORKERS = {
    "preprocessing": "preprocessing",
    "training_worker": f"training.{SITE}",
    "inference": "inference",
    "aggregation": "aggregation",
}


def exported_names(text: str) -> set[str]:
    names = {base_metric_name(m) for m in re.findall(r"^# TYPE (\S+) ", text, flags=re.M)}
    # prometheus_client declares counters without their _total suffix in TYPE lines
    return names | {f"{n}_total" for n in names}


@pytest.fixture(scope="module")
def worker_metrics(postgres_url: str, redis_url: str, s3_url: str, tmp_path_factory) -> Iterator[dict[str, str]]:
    """Start each ML worker through the image entrypoint; yield its metrics URL by service."""
    from services.aggregation import models as aggregation_models
    from shared.db import models as shared_models
    from shared.db.base import run_migrations

    # In the cluster the aggregation API migrates its tables before its worker resumes unfinished runs.
    run_migrations(postgres_url, shared_models.MIGRATIONS, shared_models.VERSION_TABLE)
    run_migrations(postgres_url, aggregation_models.MIGRATIONS, aggregation_models.VERSION_TABLE)
    logs = tmp_path_factory.mktemp("workers")
    procs: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    for service, queue in WORKERS.items():
        port = free_port()
        env = dict(
            os.environ,
            PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
            PYTHONPATH=str(ROOT),
            VOXELFLOW_SERVICE=service,
            VOXELFLOW_CELERY_QUEUE=queue,
            VOXELFLOW_CELERY_POOL="solo",
            VOXELFLOW_CELERY_CONCURRENCY="1",
            VOXELFLOW_METRICS_PORT=str(port),
            VOXELFLOW_DATABASE_URL=postgres_url,
            VOXELFLOW_BROKER_URL=redis_url,
            VOXELFLOW_STORAGE_URL=s3_url,
            VOXELFLOW_SITE=SITE,
            VOXELFLOW_AGGREGATION_QUEUE="aggregation",
            VOXELFLOW_TRAINING_QUEUE_PREFIX="training.",
            VOXELFLOW_TORCH_THREADS="1",
            VOXELFLOW_LOG_JSON="false",
            VOXELFLOW_LOG_LEVEL="WARNING",
            OMP_NUM_THREADS="1",
        )
        log = (logs / f"{service}.log").open("wb")
        proc = subprocess.Popen(["sh", str(ENTRYPOINT), "worker"], cwd=ROOT, env=env, stdout=log, stderr=log)
        procs[service] = (proc, f"http://127.0.0.1:{port}/metrics")
    try:
        deadline = time.monotonic() + 240  # torch/MONAI imports on a shared 2-core CI machine
        pending = dict(procs)
        while pending:
            for service, (proc, url) in list(pending.items()):
                if proc.poll() is not None:
                    pytest.fail(f"{service} worker exited {proc.returncode}:\n{(logs / f'{service}.log').read_text()}")
                try:
                    if httpx.get(url, timeout=2).status_code == 200:
                        del pending[service]
                except httpx.HTTPError:
                    pass
            if time.monotonic() > deadline:
                pytest.fail(f"workers without /metrics after 240 s: {sorted(pending)}")
            time.sleep(0.5)
        yield {service: url for service, (_, url) in procs.items()}
    finally:
        for proc, _ in procs.values():
            proc.terminate()
        for proc, _ in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


#: (chart component, ServiceMonitor port) each local process plays; ingest-api is the in-process ingest service
LOCAL_COMPONENTS = {
    "preprocessing": ("preprocessing-worker", "metrics"),
    "training_worker": ("training-worker-site-a", "metrics"),
    "inference": ("inference-worker", "metrics"),
    "aggregation": ("aggregation-worker", "metrics"),
}


@pytest.fixture(scope="module")
def prometheus(ingest_service, worker_metrics, rendered, tmp_path_factory) -> Iterator[PrometheusServer]:  # noqa: F811
    """A real Prometheus scraping the running processes with the ServiceMonitors' jobs and labels, every
    second, and evaluating the chart's alert rules; ready once every target has been scraped once."""
    docs = rendered["gpu"]
    targets = {LOCAL_COMPONENTS[s]: url.split("/")[2] for s, url in worker_metrics.items()}
    targets[("ingest-api", "http")] = ingest_service.url.split("/")[2]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": scrape_configs(docs, targets),
    }
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    with running_prometheus(config, rule_groups(rule), tmp_path_factory.mktemp("prometheus"), free_port()) as prom:
        deadline = time.monotonic() + 60
        while True:
            active = prom.targets()
            if len(active) == len(targets) and all(t["health"] == "up" for t in active):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"Prometheus targets not all up after 60 s: {active}")
            time.sleep(0.5)
        yield prom


@pytest.fixture(scope="module")
def worked(worker_metrics, redis_url, prometheus) -> dict[str, str]:
    """One task through the training, preprocessing and aggregation workers, each refused as bad input.

    Some services import their metrics module with the task code (preprocessing), so a worker declares
    them from its first task on; and a refused round must be counted where Prometheus scrapes.
    """
    from celery import Celery

    client = Celery("live-metrics", broker=redis_url, backend=redis_url)
    message = {
        "run_id": "live",
        "round": 1,
        "site": "another-site",
        "task_attempt_id": "a1",
        "dataset_version_id": "ds-0000000000000000",
        "global_weights_uri": "federated/live/round-0001/global.pt",
        "training_config_uri": "federated/live/training-config.yaml",
    }
    round_result = client.send_task("training.train_round", args=[message], queue=f"training.{SITE}")
    build_result = client.send_task("preprocessing.build_dataset", args=["no-such-build"], queue="preprocessing")
    advance_result = client.send_task("aggregation.advance_run", args=["no-such-run"], queue="aggregation")
    errors = {}
    for what, result in (("round", round_result), ("build", build_result), ("advance", advance_result)):
        with pytest.raises(Exception) as excinfo:  # the services raise their own error types
            result.get(timeout=120)
        errors[what] = str(excinfo.value)
    assert "site" in errors["round"], errors
    assert "no federated run no-such-run" in errors["advance"], errors
    return worker_metrics


def test_task_metrics_reach_the_scraped_endpoint(worked):
    """The refused round is counted by the solo worker's /metrics (with prefork it would stay in a child)."""
    text = httpx.get(worked["training_worker"], timeout=10).text
    samples = re.findall(r"^voxelflow_training_rounds_total\{([^}]*)\} (\S+)$", text, flags=re.M)
    refused = [float(v) for labels, v in samples if f'site="{SITE}"' in labels and 'outcome="refused"' in labels]
    assert refused == [1.0], text


def test_each_service_exports_its_own_metrics(worked):
    """Metrics are attributed to the process that records them, not just importable somewhere."""
    own = {
        "preprocessing": "voxelflow_preprocessing_case_seconds",
        "training_worker": "voxelflow_training_rounds_total",
        "inference": "voxelflow_inference_windows_total",
        "aggregation": "voxelflow_aggregation_rounds_aggregated_total",
    }
    for service, url in worked.items():
        names = exported_names(httpx.get(url, timeout=10).text)
        assert own[service] in names, f"{service} does not export {own[service]}"
        assert "voxelflow_celery_tasks_total" in names


def test_dashboard_and_alert_metrics_are_exported_by_running_services(ingest_service, worked, rendered):  # noqa: F811
    rules = [d for d in rendered["gpu"] if d["kind"] == "PrometheusRule"]
    used = {name for name in chart_metric_names(rules) if name.startswith("voxelflow_")}
    assert {
        "voxelflow_training_rounds_total",
        "voxelflow_inference_windows_total",
        "voxelflow_aggregation_rounds_failed_total",
        "voxelflow_aggregation_round_duration_seconds",
        "voxelflow_aggregation_privacy_epsilon",
    } <= used
    exported = exported_names(httpx.get(f"{ingest_service.url}/metrics", timeout=10).text)
    for url in worked.values():
        exported |= exported_names(httpx.get(url, timeout=10).text)
    missing = sorted(used - exported)
    assert not missing, f"dashboards/rules use metrics no service exports: {missing}"


# --- the same processes through a real Prometheus ------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_like_run(worked, ingest_service, prometheus) -> dict[str, str]:  # noqa: F811
    """The refused tasks of ``worked`` plus STOW traffic into the ingest API: one instance stored, one
    rejected (no SOP Instance UID); ready once Prometheus holds two scrapes of each ingest counter, since
    ``rate``/``increase`` over a series seen only once return nothing (the CI run that found it)."""
    from tests.ingest.conftest import stow
    from tests.ingest.test_dicomweb_api import minimal_image

    with ingest_service.client("pacs") as client:
        response = stow(client, [minimal_image(), minimal_image(SOPInstanceUID=None)])
    assert response.status_code in {200, 202, 409}, response.text
    deadline = time.monotonic() + 30
    for counter in (
        "voxelflow_ingest_instances_received_total",
        "voxelflow_ingest_instances_rejected_total",
        "voxelflow_ingest_bytes_received_total",
    ):
        query = f'rate({counter}{{job="ingest-api", source="stow"}}[1m])'
        while not prometheus.query(query):
            assert time.monotonic() < deadline, f"Prometheus has no {query} 30 s after a STOW"
            time.sleep(0.5)
    return worked


def _alert_rules(prometheus: PrometheusServer) -> list[dict]:
    return [r for g in prometheus.api("rules", type="alert")["groups"] for r in g["rules"]]  # type: ignore[index]


def test_prometheus_scrapes_each_process_with_the_service_monitor_labels(prometheus, demo_like_run):
    """job from jobLabel (the component), namespace/service/endpoint as prometheus-operator sets them."""
    by_job = {t["labels"]["job"]: t for t in prometheus.targets()}
    assert set(by_job) == {"ingest-api", *(c for c, _ in LOCAL_COMPONENTS.values())}
    for job, target in by_job.items():
        assert target["health"] == "up", target
        labels = target["labels"]
        assert labels["namespace"] == "voxelflow"
        assert labels["service"].startswith(f"vf-voxelflow-{job}"), labels
        assert labels["endpoint"] == ("http" if job == "ingest-api" else "metrics")
        assert target["scrapePool"].startswith("serviceMonitor/voxelflow/vf-voxelflow-")
    # honor_labels false, as the operator renders it: the process's own `service` label is kept aside
    query = 'sum by (job, exported_service) (voxelflow_celery_tasks_total{job="aggregation-worker"})'
    assert [s["metric"] for s in prometheus.query(query)] == [
        {"job": "aggregation-worker", "exported_service": "aggregation"}
    ]


def test_prometheus_evaluates_every_alert_rule_of_the_chart(prometheus, demo_like_run, rendered):
    """Every alert of the rendered PrometheusRule is loaded and evaluated by Prometheus without an error."""
    (chart_rule,) = [d for d in rendered["gpu"] if d["kind"] == "PrometheusRule"]
    expected = {r["alert"] for g in chart_rule["spec"]["groups"] for r in g["rules"]}
    rules = _alert_rules(prometheus)
    assert {r["name"] for r in rules} == expected
    deadline = time.monotonic() + 30
    while any(r["lastEvaluation"].startswith("0001") for r in rules) and time.monotonic() < deadline:
        time.sleep(0.5)
        rules = _alert_rules(prometheus)
    bad = {r["name"]: (r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"}
    assert not bad, bad


def test_a_refused_round_makes_the_refused_rounds_alert_pending(prometheus, demo_like_run, redis_url):
    """The alert fires on the real counter: a second refused round (increase() needs a change between two
    scrapes; the first one created the series) puts VoxelflowTrainingRoundsRefused in pending."""
    from celery import Celery

    client = Celery("live-metrics-alert", broker=redis_url, backend=redis_url)
    message = {"run_id": "live", "round": 2, "site": "another-site", "task_attempt_id": "a2"}
    message |= {"dataset_version_id": "ds-0000000000000000", "global_weights_uri": "x", "training_config_uri": "y"}
    with pytest.raises(Exception, match="site"):
        client.send_task("training.train_round", args=[message], queue=f"training.{SITE}").get(timeout=120)
    deadline = time.monotonic() + 60
    while True:
        alerts = prometheus.api("alerts")["alerts"]  # type: ignore[index]
        refused = [a for a in alerts if a["labels"]["alertname"] == "VoxelflowTrainingRoundsRefused"]
        if refused:
            break
        assert time.monotonic() < deadline, f"no VoxelflowTrainingRoundsRefused after 60 s: {alerts}"
        time.sleep(0.5)
    (alert,) = refused
    assert alert["state"] in {"pending", "firing"}
    assert alert["labels"]["site"] == SITE and alert["labels"]["namespace"] == "voxelflow"
    assert alert["labels"]["severity"] == "warning"


def _queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard panel and variable, and of the autoscaling queries."""
    out = []
    for path in dashboard_files():
        for expr in dashboard_expressions(json.loads(path.read_text())):
            out.append((path.name, grafana_to_promql(expr)))
    # KEDA scales workers on the Redis list itself; its Prometheus view is the queue-length gauge
    out.append(("keda", 'max by (queue) (voxelflow_celery_queue_length{namespace="voxelflow"})'))
    for query in adapter_queries((ROOT / "docs" / "kubernetes.md").read_text()):
        out.append(("prometheus-adapter", query))
    return out


def test_every_dashboard_and_scaling_query_is_accepted_and_returns_data(prometheus, demo_like_run):
    """Prometheus parses and runs every query; each whose series this run produced returns data.

    A query returns nothing in a healthy cluster only when a series it selects does not exist yet (no round
    has diverged, no GPU here). So: for every query whose vector selectors each select at least one series,
    the query itself must return at least one sample; and the series this run drives must be among them.
    """
    empty, answered = [], []
    for where, query in _queries():
        result = prometheus.query(query)  # raises on a parse or evaluation error
        selectors = vector_selectors(query)
        assert selectors, query
        if all(prometheus.query(f"count({s})") for s in selectors):
            (answered if result else empty).append((where, query))
    assert not empty, f"queries over existing series that return nothing: {empty}"
    answered_text = "\n".join(q for _, q in answered)
    for driven in (
        "voxelflow_http_requests_total",
        "voxelflow_http_request_duration_seconds_bucket",
        "voxelflow_celery_tasks_total",
        "voxelflow_celery_task_duration_seconds_bucket",
        "voxelflow_celery_queue_length",
        'outcome="refused"',
        "voxelflow_ingest_instances_received_total",
        "voxelflow_ingest_instances_rejected_total",
        "voxelflow_ingest_bytes_received_total",
        "voxelflow_ingest_last_received_timestamp_seconds",
    ):
        assert driven in answered_text, f"no query over {driven} returned data: {answered}"
