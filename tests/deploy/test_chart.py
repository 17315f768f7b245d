"""charts/voxelflow: lint, render, schema-validate and check platform invariants on every ci/ scenario."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import CHART, SCENARIOS, helm_template
from .k8s_helpers import CRD_KINDS, containers, name, pod_templates, selector_matches

K8S_VERSION = "1.34.0"  # validated with kubernetes-validate --strict (the package ships schemas up to 1.37)
EXPOSED_COMPONENTS = {"ingest-api", "inference-api"}


def kinds(docs, kind):
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint(helm, scenario):
    proc = subprocess.run(
        [str(helm), "lint", str(CHART), "--strict", "-f", str(CHART / "ci" / f"{scenario}-values.yaml")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_scenarios_exist():
    assert set(SCENARIOS) >= {"cpu", "gpu", "external-deps"}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_kubernetes_validate_strict(rendered, scenario, tmp_path):
    """Every built-in kind validates against the strict Kubernetes OpenAPI schema (unknown fields fail)."""
    docs = [d for d in rendered[scenario] if d["kind"] not in CRD_KINDS]
    f = tmp_path / f"{scenario}.yaml"
    f.write_text(yaml.safe_dump_all(docs))
    exe = Path(sys.executable).with_name("kubernetes-validate")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "kubernetes_validate"]
    proc = subprocess.run([*cmd, "--strict", "-k", K8S_VERSION, str(f)], capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "ERROR" not in out and "WARN" not in out, out
    assert out.count("INFO") == len(docs), out


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_workload_hardening(rendered, scenario):
    """Probes, resources, non-root, read-only root fs with an emptyDir /tmp, no capabilities, seccomp."""
    problems = []
    for wl, tpl in pod_templates(rendered[scenario]):
        pod_sc = tpl["spec"].get("securityContext", {})
        volumes = {v["name"]: v for v in tpl["spec"].get("volumes", [])}
        if tpl["spec"].get("automountServiceAccountToken") is not False:
            problems.append(f"{name(wl)}: service account token mounted")
        for c in containers(tpl):
            where = f"{name(wl)}[{c['name']}]"
            sc = c.get("securityContext", {})
            if wl["kind"] != "Job":
                for probe in ("livenessProbe", "readinessProbe"):
                    if probe not in c:
                        problems.append(f"{where}: no {probe}")
            res = c.get("resources", {})
            for section in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in res.get(section, {}):
                        problems.append(f"{where}: no resources.{section}.{r}")
            if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
                problems.append(f"{where}: may run as root")
            if (sc.get("runAsUser", pod_sc.get("runAsUser")) or 0) == 0:
                problems.append(f"{where}: runAsUser 0/unset")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: root filesystem writable")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: privilege escalation allowed")
            if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("capabilities", {}).get("add"):
                problems.append(f"{where}: capabilities not dropped")
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            if seccomp.get("type") != "RuntimeDefault":
                problems.append(f"{where}: seccomp not RuntimeDefault")
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            if not tmp or "emptyDir" not in volumes.get(tmp[0]["name"], {}):
                problems.append(f"{where}: no emptyDir /tmp")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scalers_target_existing_deployments(rendered, scenario):
    docs = rendered[scenario]
    deployments = {d["metadata"]["name"]: d for d in kinds(docs, "Deployment")}
    scalers = kinds(docs, "HorizontalPodAutoscaler") + kinds(docs, "ScaledObject")
    for s in scalers:
        ref = s["spec"]["scaleTargetRef"]
        assert ref.get("kind", "Deployment") == "Deployment" and ref["name"] in deployments, name(s)
        # A scaler owns the replica count: the Deployment must not pin it (helm upgrade would reset it).
        assert "replicas" not in deployments[ref["name"]]["spec"], f"{name(s)} target pins replicas"
    names = [s["spec"]["scaleTargetRef"]["name"] for s in scalers]
    assert len(names) == len(set(names)), "two scalers on one Deployment"


def test_gpu_scenario_scalers(rendered):
    docs = rendered["gpu"]
    hpa = {d["metadata"]["name"]: d for d in kinds(docs, "HorizontalPodAutoscaler")}
    triton = hpa["vf-voxelflow-triton"]
    metrics = {m["pods"]["metric"]["name"] for m in triton["spec"]["metrics"] if m["type"] == "Pods"}
    assert metrics == {
        "DCGM_FI_DEV_GPU_UTIL",
        "nv_inference_queue_duration_us",
        "nv_inference_request_success",
    }
    scaled = kinds(docs, "ScaledObject")
    assert scaled, "gpu scenario enables KEDA"
    deployments = {d["metadata"]["name"]: d for d in kinds(docs, "Deployment")}
    auths = {d["metadata"]["name"] for d in kinds(docs, "TriggerAuthentication")}
    for so in scaled:
        (trigger,) = so["spec"]["triggers"]
        assert trigger["type"] == "redis"
        assert trigger["authenticationRef"]["name"] in auths
        dep = deployments[so["spec"]["scaleTargetRef"]["name"]]
        env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert trigger["metadata"]["listName"] == env["VOXELFLOW_CELERY_QUEUE"], name(so)


def test_scaled_triton_is_shared_through_repository_polling(rendered):
    """The GPU scenario scales Triton with an HPA: every pod must load the models by itself (poll), and
    the inference service must be told so, or it would load and unload versions on one pod only."""
    docs = rendered["gpu"]
    deployments = {d["metadata"]["name"]: d for d in kinds(docs, "Deployment")}
    (triton,) = deployments["vf-voxelflow-triton"]["spec"]["template"]["spec"]["containers"]
    assert "--model-control-mode=poll" in triton["args"] and "--strict-readiness=true" in triton["args"]
    inference = [d for n, d in deployments.items() if n.startswith("vf-voxelflow-inference")]
    assert inference
    for dep in inference:
        env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["VOXELFLOW_BACKEND"] == "triton" and env["VOXELFLOW_TRITON_MODEL_CONTROL"] == "poll", name(dep)
        # a new version takes traffic only once every Triton pod has polled the repository
        poll_secs = next(int(a.split("=")[1]) for a in triton["args"] if a.startswith("--repository-poll-secs="))
        assert float(env["VOXELFLOW_TRITON_POLL_SETTLE_SECONDS"]) > poll_secs, name(dep)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_network_policies(rendered, scenario):
    """Default deny covers every pod; every pod also has its own allow policy; nothing else is open."""
    docs = rendered[scenario]
    policies = kinds(docs, "NetworkPolicy")
    deny = [p for p in policies if p["metadata"]["name"].endswith("-default-deny")]
    assert len(deny) == 1 and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny[0]["spec"] and "egress" not in deny[0]["spec"]
    specific = [p for p in policies if p not in deny and not p["metadata"]["name"].endswith("-allow-dns")]
    for wl, tpl in pod_templates(docs):
        labels = tpl["metadata"]["labels"]
        assert selector_matches(deny[0]["spec"]["podSelector"], labels), f"{name(wl)} not default-denied"
        own = [p for p in specific if selector_matches(p["spec"]["podSelector"], labels)]
        assert own, f"{name(wl)} selected by no specific NetworkPolicy"
    # Only the DICOM port accepts IP blocks (outside the cluster); APIs only from the ingress controller.
    for p in specific:
        for rule in p["spec"].get("ingress", []):
            if any("ipBlock" in peer for peer in rule.get("from", [])):
                assert p["metadata"]["name"].endswith("-ingest-dimse"), p["metadata"]["name"]
                assert [pt["port"] for pt in rule["ports"]] == ["dicom"]
            if any(
                ("namespaceSelector" in peer and "podSelector" not in peer) or "ingress-nginx" in json.dumps(peer)
                for peer in rule.get("from", [])
            ) and any(pt["port"] == "http" for pt in rule.get("ports", [])):
                comp = p["metadata"]["labels"]["app.kubernetes.io/component"]
                monitoring = "monitoring" in json.dumps(rule["from"])
                assert monitoring or comp in EXPOSED_COMPONENTS, f"{comp} reachable from another namespace"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_egress_least_privilege(rendered, scenario):
    """Each app reaches only the dependencies it needs (e.g. the model registry never reaches Redis)."""
    docs = rendered[scenario]
    by_comp = {p["metadata"]["labels"].get("app.kubernetes.io/component"): p for p in kinds(docs, "NetworkPolicy")}

    def egress_text(comp):
        return json.dumps(by_comp[comp]["spec"].get("egress", []))

    if scenario != "external-deps":
        assert 'component": "redis"' not in egress_text("model-registry-api")
        assert 'component": "triton"' not in egress_text("ingest-worker")
        assert 'component": "triton"' in egress_text("inference-worker")
        assert 'component": "mlflow"' not in egress_text("preprocessing-worker")
        assert by_comp["redis"]["spec"]["egress"] == []
        assert by_comp["postgresql"]["spec"]["egress"] == []


def _secret_values(docs) -> set[str]:
    values = set()
    for s in kinds(docs, "Secret"):
        for v in (s.get("data") or {}).values():
            values.add(base64.b64decode(v).decode())
        values.update((s.get("stringData") or {}).values())
    return {v for v in values if len(v) >= 8}


URL_CREDS = re.compile(r"://([^:/@\s]*):([^@\s]*)@")
CREDENTIAL_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN|_KEY$|ACCESS_KEY|DEID)", re.IGNORECASE)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_no_plaintext_credentials(rendered, rendered_text, scenario):
    docs = rendered[scenario]
    secrets = _secret_values(docs)
    problems = []
    non_secret_text = yaml.safe_dump_all([d for d in docs if d["kind"] != "Secret"])
    for v in secrets:
        if v in non_secret_text:
            problems.append(f"a Secret value appears outside Secrets: {v[:4]}…")
    for cm in kinds(docs, "ConfigMap"):
        for k, v in (cm.get("data") or {}).items():
            if URL_CREDS.search(v or "") or (CREDENTIAL_NAME.search(k) and not k.endswith(".json")):
                problems.append(f"{name(cm)}: credential-like entry {k}")
    for wl, tpl in pod_templates(docs):
        for c in containers(tpl):
            for e in c.get("env", []):
                value = e.get("value")
                if value is None:
                    continue
                if CREDENTIAL_NAME.search(e["name"]):
                    problems.append(f"{name(wl)}: {e['name']} has a literal value")
                for _user, password in URL_CREDS.findall(value):
                    if password and not re.fullmatch(r"\$\([A-Z0-9_]+\)", password):
                        problems.append(f"{name(wl)}: {e['name']} embeds a literal password")
            for arg in c.get("args", []) + c.get("command", []):
                for _, password in URL_CREDS.findall(arg):
                    if password and not re.fullmatch(r"\$\([A-Z0-9_]+\)", password):
                        problems.append(f"{name(wl)}: argument embeds a password")
    assert not problems, "\n".join(problems)


def test_generated_secrets_are_kept(rendered):
    """Chart-generated credentials survive upgrade (lookup) and uninstall (resource-policy keep)."""
    generated = kinds(rendered["cpu"], "Secret")
    assert {s["metadata"]["name"] for s in generated} == {
        "vf-voxelflow-app",
        "vf-voxelflow-postgresql",
        "vf-voxelflow-redis",
        "vf-voxelflow-minio",
    }
    for s in generated:
        assert s["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert not kinds(rendered["external-deps"], "Secret"), "external-deps uses existingSecrets only"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_secret_references_resolve(rendered, scenario):
    """Every secretKeyRef names a Secret the chart renders, or one the scenario declares as existingSecret."""
    docs = rendered[scenario]
    values = yaml.safe_load((CHART / "ci" / f"{scenario}-values.yaml").read_text())
    existing = {v for v in re.findall(r"existingSecret: (\S+)", yaml.safe_dump(values))}
    rendered_secrets = {s["metadata"]["name"]: s for s in kinds(docs, "Secret")}
    for wl, tpl in pod_templates(docs):
        for c in containers(tpl):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if not ref:
                    continue
                if ref["name"] in rendered_secrets:
                    assert ref["key"] in rendered_secrets[ref["name"]]["data"], f"{name(wl)} {ref}"
                else:
                    assert ref["name"] in existing, f"{name(wl)} references unknown Secret {ref['name']}"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_only_ingest_and_inference_exposed(rendered, scenario):
    docs = rendered[scenario]
    services = {s["metadata"]["name"]: s for s in kinds(docs, "Service")}
    for ing in kinds(docs, "Ingress"):
        assert ing["spec"]["tls"], f"{name(ing)} without TLS"
        tls_hosts = {h for t in ing["spec"]["tls"] for h in t["hosts"]}
        for rule in ing["spec"]["rules"]:
            assert rule["host"] in tls_hosts
            for path in rule["http"]["paths"]:
                svc = services[path["backend"]["service"]["name"]]
                assert svc["metadata"]["labels"]["app.kubernetes.io/component"] in EXPOSED_COMPONENTS
    exposed = {
        s["metadata"]["labels"]["app.kubernetes.io/component"]
        for s in services.values()
        if s["spec"].get("type", "ClusterIP") != "ClusterIP"
    }
    assert exposed <= {"ingest-dimse"}, exposed


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_selectors_match_pods(rendered, scenario):
    docs = rendered[scenario]
    labels = [tpl["metadata"]["labels"] for _, tpl in pod_templates(docs)]
    for svc in kinds(docs, "Service"):
        assert any(selector_matches({"matchLabels": svc["spec"]["selector"]}, lb) for lb in labels), name(svc)
    for pdb in kinds(docs, "PodDisruptionBudget"):
        assert any(selector_matches(pdb["spec"]["selector"], lb) for lb in labels), name(pdb)
    for wl, tpl in pod_templates(docs):
        if wl["kind"] != "Job":
            assert selector_matches(wl["spec"]["selector"], tpl["metadata"]["labels"]), name(wl)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_training_worker_per_site(rendered, scenario):
    values = yaml.safe_load((CHART / "ci" / f"{scenario}-values.yaml").read_text())
    sites = [s["name"] for s in (values.get("trainingWorker", {}).get("sites") or [{"name": "site-a"}])]
    gpu = values.get("trainingWorker", {}).get("gpu", {}).get("enabled", False)
    deps = {d["metadata"]["name"]: d for d in kinds(rendered[scenario], "Deployment")}
    for site in sites:
        d = deps[f"vf-voxelflow-training-worker-{site}"]
        c = d["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["VOXELFLOW_SITE"] == site and env["VOXELFLOW_CELERY_QUEUE"] == f"training.{site}"
        assert ("nvidia.com/gpu" in c["resources"]["limits"]) == gpu
        assert c["image"].endswith("-cuda") == gpu


def test_gpu_resources_only_in_gpu_scenario(rendered):
    def gpu_users(docs):
        return {
            wl["metadata"]["name"]
            for wl, tpl in pod_templates(docs)
            for c in containers(tpl)
            if "nvidia.com/gpu" in c["resources"].get("limits", {})
        }

    assert gpu_users(rendered["cpu"]) == set()
    assert gpu_users(rendered["gpu"]) == {
        "vf-voxelflow-triton",
        "vf-voxelflow-inference-worker",
        "vf-voxelflow-training-worker-site-a",
        "vf-voxelflow-training-worker-site-b",
    }


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_crds_structurally(rendered, scenario):
    """CRDs are not in kubernetes-validate's schemas: check their shape and references here."""
    docs = rendered[scenario]
    services = kinds(docs, "Service")
    for sm in kinds(docs, "ServiceMonitor"):
        assert sm["apiVersion"] == "monitoring.coreos.com/v1"
        sel = sm["spec"]["selector"]
        matched = [s for s in services if selector_matches(sel, s["metadata"]["labels"])]
        assert matched, f"{name(sm)} selects no Service"
        for ep in sm["spec"]["endpoints"]:
            assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings"}
            for s in matched:
                assert ep["port"] in {p["name"] for p in s["spec"]["ports"]}, f"{name(sm)} port {ep['port']}"
    for rule in kinds(docs, "PrometheusRule"):
        assert rule["apiVersion"] == "monitoring.coreos.com/v1"
        alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
        for r in alerts:
            assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}, r
            assert r["labels"]["severity"] in {"critical", "warning", "info"}
            assert re.fullmatch(r"\d+[smh]", r["for"])
            assert r["annotations"]["summary"] and r["annotations"]["description"]
        assert {r["alert"] for r in alerts} >= {
            "VoxelflowHighErrorRate",
            "VoxelflowHighLatencyP99",
            "VoxelflowQueueBacklog",
            "VoxelflowGPUMemoryPressure",
            "VoxelflowNoDataFromPACS",
            "VoxelflowTrainingDivergence",
        }
    for so in kinds(docs, "ScaledObject"):
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        spec = so["spec"]
        assert set(spec) <= {
            "scaleTargetRef",
            "pollingInterval",
            "cooldownPeriod",
            "minReplicaCount",
            "maxReplicaCount",
            "triggers",
            "advanced",
            "fallback",
        }
        assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        for t in spec["triggers"]:
            assert set(t["metadata"]) <= {"address", "databaseIndex", "listName", "listLength", "enableTLS"}
            assert all(isinstance(v, str) for v in t["metadata"].values()), "KEDA metadata values are strings"


def test_dashboards_configmaps(rendered):
    cms = [c for c in kinds(rendered["cpu"], "ConfigMap") if "-dashboard-" in c["metadata"]["name"]]
    assert {c["metadata"]["name"] for c in cms} == {
        "vf-voxelflow-dashboard-operations",
        "vf-voxelflow-dashboard-data",
        "vf-voxelflow-dashboard-training",
    }
    for c in cms:
        assert c["metadata"]["labels"]["grafana_dashboard"] == "1"
        (content,) = c["data"].values()
        assert json.loads(content)["uid"].startswith("voxelflow-")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["--set", "postgresql.enabled=false", "--set", "externalDatabase.host=db"],
            "externalDatabase.existingSecret",
        ),
        (["--set", "redis.enabled=false", "--set", "externalRedis.host=r"], "externalRedis.existingSecret"),
        (["--set", "minio.enabled=false", "--set", "externalS3.host=s3"], "externalS3.existingSecret"),
        (["--set", "mlflow.enabled=false"], "externalMlflow.trackingUri"),
        (["--set", "trainingWorker.sites[0].name=Site_A"], "Does not match pattern"),
        (["--set", "config.extra.VOXELFLOW_DB_PASSWORD=x"], "looks like a credential"),
        (["--set", "nope=1"], "Additional property nope is not allowed"),
        (["--set", "triton.modelControlMode=explicit", "--set", "triton.replicaCount=2"], "exactly one Triton replica"),
        (["--set", "triton.modelControlMode=none"], "modelControlMode must be one of"),
    ],
)
def test_invalid_values_rejected(helm, overrides, message):
    proc = helm_template(helm, *overrides)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
