"""Metric names referenced by PromQL expressions (dashboards, alert rules).

A small lexer-based extractor, not the Prometheus parser: it removes string literals, label matchers,
range/subquery brackets, grouping clauses and Grafana variables, checks that brackets balance and that
every called function is a PromQL function, and returns the remaining bare identifiers: the metric names.

Reused by a live test: compare :func:`chart_metric_names` against the names a running service's
``/metrics`` exposes (histograms expose ``_bucket``/``_sum``/``_count``: see :func:`base_metric_name`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

CHART_DIR = Path(__file__).resolve().parents[2] / "charts" / "voxelflow"

# The platform's metric convention (services export exactly these).
PLATFORM_COUNTERS = {
    "voxelflow_http_requests_total",
    "voxelflow_ingest_instances_received_total",
    "voxelflow_ingest_instances_rejected_total",
    "voxelflow_ingest_bytes_received_total",
    "voxelflow_ingest_series_reconstructed_total",
    "voxelflow_celery_tasks_total",
    # services/preprocessing/metrics.py
    "voxelflow_preprocessing_cases_processed_total",
    "voxelflow_preprocessing_cases_failed_total",
    "voxelflow_preprocessing_dataset_versions_total",
    "voxelflow_preprocessing_qc_excluded_total",
    # services/training_worker/metrics.py
    "voxelflow_training_epochs_total",
    "voxelflow_training_rounds_total",
    # services/inference/metrics.py
    "voxelflow_inference_requests_total",
    "voxelflow_inference_windows_total",
    "voxelflow_inference_rejected_total",
    "voxelflow_inference_model_swaps_total",
    "voxelflow_inference_model_load_failures_total",
    "voxelflow_routing_series_total",
    # services/model_registry/metrics.py
    "voxelflow_registry_promotions_total",
    # services/aggregation/metrics.py
    "voxelflow_aggregation_runs_total",
    "voxelflow_aggregation_rounds_dispatched_total",
    "voxelflow_aggregation_rounds_aggregated_total",
    "voxelflow_aggregation_rounds_failed_total",
    "voxelflow_aggregation_updates_total",
    "voxelflow_aggregation_site_outcomes_total",
}
PLATFORM_GAUGES = {
    "voxelflow_http_requests_in_progress",
    "voxelflow_ingest_last_received_timestamp_seconds",
    "voxelflow_celery_queue_length",
    "voxelflow_dead_letters",
    "voxelflow_training_samples_per_second",
    "voxelflow_training_loss",
    "voxelflow_training_val_dice",
    "voxelflow_inference_queue_depth",
    "voxelflow_inference_model_info",
    "voxelflow_registry_champion_version",
    "voxelflow_aggregation_privacy_epsilon",
}
PLATFORM_HISTOGRAMS = {
    "voxelflow_http_request_duration_seconds",
    "voxelflow_celery_task_duration_seconds",
    "voxelflow_preprocessing_case_seconds",
    "voxelflow_inference_request_duration_seconds",
    "voxelflow_inference_model_duration_seconds",
    "voxelflow_aggregation_round_participants",
    "voxelflow_aggregation_round_duration_seconds",
}
PLATFORM_METRICS = PLATFORM_COUNTERS | PLATFORM_GAUGES | PLATFORM_HISTOGRAMS
TRITON_METRICS = {
    "nv_inference_request_success",
    "nv_inference_queue_duration_us",
    "nv_inference_count",
    "nv_gpu_utilization",
    "nv_gpu_memory_used_bytes",
    "nv_gpu_memory_total_bytes",
}
DCGM_METRICS = {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"}
ALLOWED_METRICS = PLATFORM_METRICS | TRITON_METRICS | DCGM_METRICS

PROMQL_FUNCTIONS = {
    # aggregation operators
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    # functions
    "abs",
    "absent",
    "absent_over_time",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "day_of_month",
    "day_of_week",
    "day_of_year",
    "days_in_month",
    "delta",
    "deriv",
    "exp",
    "floor",
    "histogram_avg",
    "histogram_count",
    "histogram_fraction",
    "histogram_quantile",
    "histogram_stddev",
    "histogram_stdvar",
    "histogram_sum",
    "holt_winters",
    "double_exponential_smoothing",
    "hour",
    "idelta",
    "increase",
    "irate",
    "label_join",
    "label_replace",
    "ln",
    "log2",
    "log10",
    "minute",
    "month",
    "predict_linear",
    "rate",
    "resets",
    "round",
    "scalar",
    "sgn",
    "sort",
    "sort_desc",
    "sort_by_label",
    "sort_by_label_desc",
    "sqrt",
    "time",
    "timestamp",
    "vector",
    "year",
    "avg_over_time",
    "min_over_time",
    "max_over_time",
    "sum_over_time",
    "count_over_time",
    "quantile_over_time",
    "stddev_over_time",
    "stdvar_over_time",
    "last_over_time",
    "present_over_time",
    "acos",
    "acosh",
    "asin",
    "asinh",
    "atan",
    "atanh",
    "cos",
    "cosh",
    "sin",
    "sinh",
    "tan",
    "tanh",
    "deg",
    "rad",
    "pi",
}
KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
    "atan2",
    "start",
    "end",
}

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$__\w+|\$\w+")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE)
_OFFSET = re.compile(r"\boffset\s+-?[0-9a-z]+", re.IGNORECASE)
_TOKEN = re.compile(
    r"(?P<num>(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?))"
    r"|(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)|(?P<other>\S)"
)


class PromQLError(ValueError):
    """The expression is not well formed."""


def _strip_brackets(expr: str, open_: str, close: str) -> str:
    out, depth = [], 0
    for ch in expr:
        if ch == open_:
            depth += 1
            continue
        if ch == close:
            depth -= 1
            if depth < 0:
                raise PromQLError(f"unbalanced {close!r} in {expr!r}")
            continue
        if depth == 0:
            out.append(ch)
    if depth:
        raise PromQLError(f"unbalanced {open_!r} in {expr!r}")
    return "".join(out)


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (``foo{a="b"}[5m]`` gives ``{"foo"}``)."""
    # Grafana's label_values(metric, label) / label_values(label): only the metric is a selector.
    m = re.fullmatch(r"\s*label_values\((.*)\)\s*", expr, re.DOTALL)
    if m:
        inner = _strip_brackets(_STRING.sub('""', m.group(1)), "{", "}")
        parts = [p.strip() for p in inner.split(",")]
        return metric_names(parts[0]) if len(parts) == 2 else set()
    s = _STRING.sub('""', expr)
    s = _GRAFANA_VAR.sub("1", s)
    s = _strip_brackets(s, "{", "}")
    s = _strip_brackets(s, "[", "]")
    s = _OFFSET.sub(" ", s)
    s = _GROUPING.sub(" ", s)
    depth = 0
    for ch in s:
        depth += ch == "("
        depth -= ch == ")"
        if depth < 0:
            raise PromQLError(f"unbalanced ')' in {expr!r}")
    if depth:
        raise PromQLError(f"unbalanced '(' in {expr!r}")
    names: set[str] = set()
    tokens = [(t.lastgroup, t.group()) for t in _TOKEN.finditer(s)]
    for i, (kind, text) in enumerate(tokens):
        if kind != "ident":
            continue
        nxt = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if nxt == "(":
            if text not in PROMQL_FUNCTIONS:
                raise PromQLError(f"unknown function {text!r} in {expr!r}")
            continue
        if text.lower() in KEYWORDS:
            continue
        names.add(text)
    if not names and not re.search(r"\d", s):
        raise PromQLError(f"no metric and no number in {expr!r}")
    return names


def base_metric_name(name: str) -> str:
    """``x_bucket``/``x_sum``/``x_count`` of a known histogram -> ``x``; anything else unchanged."""
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in PLATFORM_HISTOGRAMS:
            return name[: -len(suffix)]
    return name


def dashboard_expressions(dashboard: dict) -> list[str]:
    """Every PromQL expression in a Grafana dashboard: panel targets and query variables."""
    exprs: list[str] = []

    def panels(items: Iterable[dict]) -> None:
        for p in items:
            exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            panels(p.get("panels", []))

    panels(dashboard.get("panels", []))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var.get("query")
            exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


def rule_expressions(prometheus_rule: dict) -> list[str]:
    """Every ``expr`` of a PrometheusRule object."""
    return [r["expr"] for g in prometheus_rule["spec"]["groups"] for r in g["rules"]]


def dashboard_files() -> list[Path]:
    return sorted((CHART_DIR / "dashboards").glob("*.json"))


def chart_metric_names(rules: Iterable[dict] = ()) -> set[str]:
    """Metric names (histograms folded to their base) used by the dashboards and the given rules."""
    names: set[str] = set()
    for f in dashboard_files():
        for e in dashboard_expressions(json.loads(f.read_text())):
            names |= metric_names(e)
    for rule in rules:
        for e in rule_expressions(rule):
            names |= metric_names(e)
    return {base_metric_name(n) for n in names}
