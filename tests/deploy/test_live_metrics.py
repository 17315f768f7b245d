"""Every ``voxelflow_*`` metric the dashboards and alert rules use is really exported: scraped from the
``/metrics`` endpoint of a running ingest service (real PostgreSQL, S3, Redis). Triton and DCGM metrics
come from those components themselves and are checked by name list only (tests/deploy/test_dashboards.py)."""

from __future__ import annotations

import re

import httpx

from tests.deploy.promql import base_metric_name, chart_metric_names
from tests.ingest.conftest import ingest_env, ingest_service, shared_data  # noqa: F401  (fixtures)


def test_dashboard_and_alert_metrics_are_exported_by_the_running_service(ingest_service, rendered):  # noqa: F811
    rules = [d for d in rendered["gpu"] if d["kind"] == "PrometheusRule"]
    used = {name for name in chart_metric_names(rules) if name.startswith("voxelflow_")}
    assert used, "the chart's dashboards and rules use voxelflow metrics"
    with httpx.Client(base_url=ingest_service.url) as client:
        text = client.get("/metrics").text
    exported = {
        base_metric_name(re.sub(r"_(created)$", "", match)) for match in re.findall(r"^# TYPE (\S+) ", text, flags=re.M)
    }
    # prometheus_client declares counters without their _total suffix in TYPE lines
    exported |= {f"{name}_total" for name in exported}
    missing = sorted(used - exported)
    assert not missing, f"dashboards/rules use metrics no service exports: {missing}"
