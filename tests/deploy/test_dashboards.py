"""Dashboards and alert rules use only the platform's metric names (and Triton's / DCGM exporter's)."""

from __future__ import annotations

import json

import pytest

from .promql import (
    ALLOWED_METRICS,
    PromQLError,
    base_metric_name,
    chart_metric_names,
    dashboard_expressions,
    dashboard_files,
    metric_names,
    rule_expressions,
)


def _rules(rendered):
    return [d for d in rendered["gpu"] if d["kind"] == "PrometheusRule"]


def test_dashboard_files_present():
    assert {f.stem for f in dashboard_files()} == {"operations", "data", "training"}


@pytest.mark.parametrize("path", dashboard_files(), ids=lambda p: p.name)
def test_dashboard_metrics_are_known(path):
    dashboard = json.loads(path.read_text())
    exprs = dashboard_expressions(dashboard)
    assert len(exprs) >= 8
    for expr in exprs:
        scoped = expr.startswith("label_values(") and expr.endswith(", namespace)")  # the namespace picker itself
        names = {base_metric_name(n) for n in metric_names(expr)}
        assert names, f"no metric in {expr!r}"
        assert names <= ALLOWED_METRICS, f"unknown metric(s) {names - ALLOWED_METRICS} in {expr!r}"
        assert (
            scoped
            or "$namespace" in expr
            or not (names & {n for n in ALLOWED_METRICS if n.startswith(("voxelflow_", "nv_"))})
        ), f"voxelflow/Triton query not scoped to $namespace: {expr!r}"
    # unique panel ids and the datasource variable
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert any(v["type"] == "datasource" for v in dashboard["templating"]["list"])


def test_rule_metrics_are_known(rendered):
    (rule,) = _rules(rendered)
    for expr in rule_expressions(rule):
        names = {base_metric_name(n) for n in metric_names(expr)}
        assert names and names <= ALLOWED_METRICS, f"{names - ALLOWED_METRICS} in {expr!r}"
        assert 'namespace="voxelflow"' in expr, f"rule not scoped to the release namespace: {expr!r}"


def test_dashboards_cover_the_platform(rendered):
    """Operations: HTTP, queues, GPU, Triton; data: ingest volume, rejections, reconstruction."""
    used = chart_metric_names(_rules(rendered))
    must = {
        "voxelflow_http_requests_total",
        "voxelflow_http_request_duration_seconds",
        "voxelflow_celery_queue_length",
        "voxelflow_ingest_instances_received_total",
        "voxelflow_ingest_instances_rejected_total",
        "voxelflow_ingest_series_reconstructed_total",
        "voxelflow_ingest_last_received_timestamp_seconds",
        "DCGM_FI_DEV_GPU_UTIL",
        "nv_gpu_memory_used_bytes",
        "nv_inference_queue_duration_us",
        # preprocessing (data), inference (operations), federated training (training)
        "voxelflow_preprocessing_cases_processed_total",
        "voxelflow_preprocessing_cases_failed_total",
        "voxelflow_preprocessing_case_seconds",
        "voxelflow_preprocessing_qc_excluded_total",
        "voxelflow_inference_request_duration_seconds",
        "voxelflow_inference_queue_depth",
        "voxelflow_inference_windows_total",
        "voxelflow_inference_model_info",
        "voxelflow_routing_series_total",
        "voxelflow_training_rounds_total",
        "voxelflow_training_loss",
        "voxelflow_training_val_dice",
        "voxelflow_training_samples_per_second",
        # aggregation (training)
        "voxelflow_aggregation_runs_total",
        "voxelflow_aggregation_rounds_aggregated_total",
        "voxelflow_aggregation_rounds_failed_total",
        "voxelflow_aggregation_round_duration_seconds",
        "voxelflow_aggregation_updates_total",
        "voxelflow_aggregation_round_participants",
        "voxelflow_aggregation_privacy_epsilon",
    }
    assert must <= used, must - used
    assert used <= ALLOWED_METRICS


def test_training_divergence_alert(rendered):
    """Divergence fires on a round that ended "diverged" and on a non-finite loss, per site."""
    (rule,) = _rules(rendered)
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    expr = alerts["VoxelflowTrainingDivergence"]["expr"]
    assert 'voxelflow_training_rounds_total{namespace="voxelflow", outcome="diverged"}' in expr
    assert "voxelflow_training_loss" in expr and "+Inf" in expr and "!=" in expr
    assert "by (namespace, site)" in expr
    assert alerts["VoxelflowTrainingDivergence"]["labels"]["severity"] == "critical"


def test_federated_alerts(rendered):
    """A round without quorum and any other run failure each page once, per namespace."""
    (rule,) = _rules(rendered)
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    quorum = alerts["VoxelflowFederatedRoundWithoutQuorum"]["expr"]
    assert 'increase(voxelflow_aggregation_rounds_failed_total{namespace="voxelflow"}[1h])) > 0' in quorum
    failed = alerts["VoxelflowFederatedRunFailed"]["expr"]
    # a quorum failure also counts as a failed run: the run alert fires only for the other failures
    assert 'voxelflow_aggregation_runs_total{namespace="voxelflow", event="failed"}' in failed
    assert ">" in failed and "voxelflow_aggregation_rounds_failed_total" in failed.split(">")[1]
    for name in ("VoxelflowFederatedRoundWithoutQuorum", "VoxelflowFederatedRunFailed"):
        assert "by (namespace)" in alerts[name]["expr"]
        assert alerts[name]["labels"]["severity"] == "warning"


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        (
            'sum by (service) (rate(voxelflow_http_requests_total{status=~"5.."}[5m]))',
            {"voxelflow_http_requests_total"},
        ),
        (
            "histogram_quantile(0.99, sum by (le) "
            "(rate(voxelflow_http_request_duration_seconds_bucket[$__rate_interval])))",
            {"voxelflow_http_request_duration_seconds_bucket"},
        ),
        (
            "time() - max(voxelflow_ingest_last_received_timestamp_seconds) > 3600",
            {"voxelflow_ingest_last_received_timestamp_seconds"},
        ),
        ("a / on (pod) group_left (node) b offset 5m", {"a", "b"}),
        (
            'label_values(voxelflow_http_requests_total{namespace="x"}, service)',
            {"voxelflow_http_requests_total"},
        ),
        ("clamp_min(rate(x[5m]), 1e-9) / 1e6", {"x"}),
    ],
)
def test_metric_name_extraction(expr, expected):
    assert metric_names(expr) == expected


@pytest.mark.parametrize("expr", ["sum(rate(x[5m])", "rate(x[5m]))", "sum(x{a='b')", "bogus_fn(x)"])
def test_malformed_expressions_rejected(expr):
    with pytest.raises(PromQLError):
        metric_names(expr)
