"""A real Prometheus (Debian's ``prometheus``) scraping local processes the way the chart's ServiceMonitors
make prometheus-operator scrape the pods, loaded with the chart's PrometheusRule.

prometheus-operator turns each ServiceMonitor endpoint into one scrape job ``serviceMonitor/<ns>/<name>/<i>``
over Kubernetes endpoints discovery, with relabelling that keeps the Services matching the selector and the
named port and sets the target labels ``namespace``, ``service``, ``pod``, ``container``, ``endpoint`` and
``job`` (from ``jobLabel``), with ``honor_labels: false`` (a scraped ``service`` label becomes
``exported_service``). :func:`scrape_configs` writes the same jobs and relabel rules; the discovery part is
replaced by static targets carrying the ``__meta_kubernetes_*`` labels that discovery would set, taken from
the rendered Service objects. So dashboards and rules see the label set they see in a cluster.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

from tests.deploy.promql import PROMQL_FUNCTIONS, metric_names

PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"

#: Grafana variables and their values for a query against a plain Prometheus (all services, sites, runs).
GRAFANA_VALUES = {
    "${namespace}": "voxelflow",
    "$namespace": "voxelflow",
    "$service": ".*",
    "$site": ".*",
    "$run_id": ".*",
    "$__rate_interval": "1m",
    "$__range": "10m",
}


def _label_name(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


def scrape_configs(docs: list[dict], targets: Mapping[tuple[str, str], str], interval: str = "1s") -> list[dict]:
    """One scrape job per ServiceMonitor endpoint, relabelled as prometheus-operator does.

    ``targets`` maps (component, port name) to the local ``host:port`` that plays the pod; Services of
    components without a local process get no target (their job stays, empty).
    """
    services = [d for d in docs if d["kind"] == "Service"]
    configs = []
    for monitor in (d for d in docs if d["kind"] == "ServiceMonitor"):
        spec = monitor["spec"]
        namespace = monitor["metadata"]["namespace"]
        selector = spec["selector"]["matchLabels"]
        for index, endpoint in enumerate(spec["endpoints"]):
            static = []
            for svc in services:
                labels = svc["metadata"].get("labels", {})
                component = labels.get("app.kubernetes.io/component", "")
                address = targets.get((component, endpoint["port"]))
                if address is None or not all(labels.get(k) == v for k, v in selector.items()):
                    continue
                ports = [p["name"] for p in svc["spec"]["ports"]]
                if endpoint["port"] not in ports:
                    continue
                meta = {f"__meta_kubernetes_service_label_{_label_name(k)}": v for k, v in labels.items()}
                meta |= {
                    "__meta_kubernetes_namespace": namespace,
                    "__meta_kubernetes_service_name": svc["metadata"]["name"],
                    "__meta_kubernetes_pod_name": f"{svc['metadata']['name']}-local",
                    "__meta_kubernetes_pod_container_name": component,
                    "__meta_kubernetes_endpoint_port_name": endpoint["port"],
                }
                static.append({"targets": [address], "labels": meta})
            relabel = [
                {
                    "source_labels": [f"__meta_kubernetes_service_label_{_label_name(k)}"],
                    "regex": re.escape(v),
                    "action": "keep",
                }
                for k, v in selector.items()
            ]
            relabel += [
                {
                    "source_labels": ["__meta_kubernetes_endpoint_port_name"],
                    "regex": endpoint["port"],
                    "action": "keep",
                },
                {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
                {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
                {
                    "source_labels": [f"__meta_kubernetes_service_label_{_label_name(spec['jobLabel'])}"],
                    "target_label": "job",
                },
                {"target_label": "endpoint", "replacement": endpoint["port"]},
            ]
            configs.append(
                {
                    "job_name": f"serviceMonitor/{namespace}/{monitor['metadata']['name']}/{index}",
                    "honor_labels": False,
                    "metrics_path": endpoint.get("path", "/metrics"),
                    "scrape_interval": interval,
                    "scrape_timeout": interval,
                    "static_configs": static,
                    "relabel_configs": relabel,
                }
            )
    return configs


def rule_groups(prometheus_rule: dict) -> dict:
    """The rules file Prometheus loads for a PrometheusRule object (what the operator writes)."""
    return {"groups": prometheus_rule["spec"]["groups"]}


def grafana_to_promql(expr: str) -> str:
    """A Grafana panel or variable query as a Prometheus query: variables filled in (see GRAFANA_VALUES);
    ``label_values(selector, label)`` becomes ``group by (label) (selector)``."""
    for var, value in sorted(GRAFANA_VALUES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", expr, re.DOTALL)
    if m:
        return f"group by ({m.group(2)}) ({m.group(1)})"
    return expr


_SELECTOR = r'(?<![\w:])({name})\s*(\{{(?:[^{{}}"]|"(?:\\.|[^"\\])*")*\}})?(?!\s*\()'


def vector_selectors(expr: str) -> list[str]:
    """The instant vector selectors (metric name + matchers) of an expression, e.g. ``up{job="x"}``."""
    out = []
    for name in sorted(metric_names(expr)):
        if name in PROMQL_FUNCTIONS:
            continue
        for m in re.finditer(_SELECTOR.format(name=re.escape(name)), expr):
            out.append(m.group(1) + (m.group(2) or ""))
    return out


def adapter_queries(markdown: str) -> list[str]:
    """prometheus-adapter ``metricsQuery`` rules documented in docs/kubernetes.md, as the adapter sends them
    for the pods of the release namespace grouped by pod."""
    queries = []
    for series, query in re.findall(r"seriesQuery: '([^']+)'.*?metricsQuery: '([^']+)'", markdown, re.DOTALL):
        name = series.split("{", 1)[0]
        ns_label = "exported_namespace" if "exported_namespace" in series else "namespace"
        pod_label = "exported_pod" if "exported_pod" in series else "pod"
        q = query.replace("<<.Series>>", name)
        q = q.replace("<<.LabelMatchers>>", f'{ns_label}="voxelflow",{pod_label}=~".+"')
        q = q.replace("<<.GroupBy>>", pod_label)
        queries.append(q)
    return queries


class PrometheusServer:
    def __init__(self, url: str):
        self.url = url

    def api(self, path: str, **params: str) -> object:
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = r.json()
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert isinstance(data, dict)
        return data["result"]

    def targets(self) -> list[dict]:
        data = self.api("targets", state="active")
        assert isinstance(data, dict)
        return data["activeTargets"]


@contextmanager
def running_prometheus(config: dict, rules: dict, workdir: Path, port: int) -> Iterator[PrometheusServer]:
    """Start ``prometheus`` on 127.0.0.1:``port`` with the config and rules; stop it afterwards."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    config = dict(config, rule_files=[str(workdir / "rules.yaml")])
    (workdir / "prometheus.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    log = (workdir / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={workdir / 'prometheus.yaml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
        ],
        stdout=log,
        stderr=log,
    )
    server = PrometheusServer(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {proc.returncode}:\n{(workdir / 'prometheus.log').read_text()}")
            try:
                if httpx.get(f"{server.url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready after 60 s:\n{(workdir / 'prometheus.log').read_text()}")
            time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
