"""The chart configures each service through the variables its settings.py really reads, and wires the ML
services (training worker, inference) the way their entrypoints expect."""

from __future__ import annotations

import json

import pytest
import yaml

from .conftest import SCENARIOS, helm_template
from .k8s_helpers import containers, pod_templates
from .settings_schema import (
    PLATFORM_ENV,
    SCHEMA_FILE,
    SERVICES,
    expected_schema_blocks,
    settings_class,
)

PACKAGE_TO_VALUES_KEY = {
    "ingest": "ingest",
    "preprocessing": "preprocessing",
    "training_worker": "trainingWorker",
    "aggregation": "aggregation",
    "model_registry": "modelRegistry",
    "inference": "inference",
}


def _env(container: dict) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _voxelflow_containers(docs):
    for wl, tpl in pod_templates(docs):
        for c in containers(tpl):
            env = _env(c)
            if "VOXELFLOW_SERVICE" in env:
                yield wl, c, env


def test_schema_settings_blocks_match_settings_classes():
    """values.schema.json is regenerated from settings.py (python -m tests.deploy.settings_schema)."""
    schema = json.loads(SCHEMA_FILE.read_text())
    for key, block in expected_schema_blocks().items():
        assert schema["properties"][key]["properties"]["settings"] == block, (
            f"{key}.settings schema is stale: run python -m tests.deploy.settings_schema"
        )


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_env_var_is_read_by_the_service(rendered, scenario):
    """A VOXELFLOW_* name that no settings field reads would be silently ignored (extra='ignore')."""
    checked = 0
    for wl, c, env in _voxelflow_containers(rendered[scenario]):
        cls = settings_class(PACKAGE_TO_VALUES_KEY[env["VOXELFLOW_SERVICE"]])
        if cls is None:
            continue  # service not on this branch yet
        fields = {f"VOXELFLOW_{name.upper()}" for name in cls.model_fields}
        config_map = {
            "VOXELFLOW_LOG_LEVEL",
            "VOXELFLOW_LOG_JSON",
            "VOXELFLOW_API_MAX_REQUEST_BYTES",
            "VOXELFLOW_API_BODY_TIMEOUT_SECONDS",
        }
        unknown = sorted(set(env) - fields - PLATFORM_ENV - config_map)
        assert not unknown, f"{wl['metadata']['name']}[{c['name']}] sets variables {cls.__name__} ignores: {unknown}"
        checked += 1
    assert checked >= 8


def test_settings_values_are_validated(helm):
    """A typo or a wrong type in a settings block fails at render time, not when the pod starts."""
    bad_key = helm_template(helm, "--set", "inference.settings.canary_shares=0.1")
    assert bad_key.returncode != 0 and "canary_shares" in bad_key.stderr
    bad_value = helm_template(helm, "--set", "inference.settings.canary_share=2")
    assert bad_value.returncode != 0 and "canary_share" in bad_value.stderr
    secret = helm_template(helm, "--set", "inference.settings.ingest_token=x")
    assert secret.returncode != 0, "credentials cannot be set as plain settings"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_training_workers(rendered, scenario):
    """Per site: celery -P solo -c 1 on training.<site>, the health app beside it, and only PostgreSQL, Redis, S3."""
    docs = rendered[scenario]
    deployments = [d for d in docs if d["kind"] == "Deployment" and "-training-worker-" in d["metadata"]["name"]]
    assert deployments
    policies = {p["metadata"]["name"]: p for p in docs if p["kind"] == "NetworkPolicy"}
    for d in deployments:
        worker, health = d["spec"]["template"]["spec"]["containers"]
        env = _env(worker)
        site = env["VOXELFLOW_SITE"]
        assert worker["args"] == ["worker"] and health["args"] == ["api"]
        assert env["VOXELFLOW_CELERY_QUEUE"] == f"training.{site}"
        assert (env["VOXELFLOW_CELERY_POOL"], env["VOXELFLOW_CELERY_CONCURRENCY"]) == ("solo", "1")
        assert health["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert health["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert _env(health)["VOXELFLOW_SITE"] == site
        egress = policies[d["metadata"]["name"]]["spec"]["egress"]
        targets = json.dumps(egress)
        for forbidden in ("mlflow", "triton", "-api", "ipBlock") if scenario != "external-deps" else ("-api",):
            assert forbidden not in targets, f"{d['metadata']['name']} may reach {forbidden}"
        assert len(egress) == 3, "PostgreSQL (dead letters), Redis, S3"


@pytest.mark.parametrize(
    ("overrides", "backend", "triton_url"),
    [([], "triton", "vf-voxelflow-triton:8001"), (["--set", "triton.enabled=false"], "onnxruntime", None)],
)
def test_inference_backend_follows_triton(helm, overrides, backend, triton_url):
    proc = helm_template(helm, *overrides)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    inference = [(wl, c, env) for wl, c, env in _voxelflow_containers(docs) if env["VOXELFLOW_SERVICE"] == "inference"]
    assert len(inference) == 2
    for _, _, env in inference:
        assert env["VOXELFLOW_BACKEND"] == backend
        assert env.get("VOXELFLOW_TRITON_URL") == triton_url
        assert env["VOXELFLOW_INGEST_URL"] == "http://vf-voxelflow-ingest-api:8000"


def test_inter_service_http_is_only_what_services_call(rendered):
    """The inference service may call the ingest API; nothing else calls another voxelflow API today."""
    docs = rendered["cpu"]
    policies = {
        p["metadata"]["labels"]["app.kubernetes.io/component"]: p
        for p in docs
        if p["kind"] == "NetworkPolicy" and "app.kubernetes.io/component" in p["metadata"]["labels"]
    }
    for comp, policy in policies.items():
        api_targets = {
            peer["podSelector"]["matchLabels"].get("app.kubernetes.io/component")
            for rule in policy["spec"].get("egress") or []
            for peer in rule["to"]
            if "podSelector" in peer
            and str(peer["podSelector"]["matchLabels"].get("app.kubernetes.io/component", "")).endswith("-api")
        }
        expected = {"ingest-api"} if comp.startswith("inference-") else set()
        assert api_targets == expected, f"{comp}: {api_targets}"
    ingest_api = policies["ingest-api"]["spec"]["ingress"]
    callers = [peer for rule in ingest_api for peer in rule["from"] if "podSelector" in peer]
    assert callers == [
        {
            "podSelector": {
                "matchLabels": {**callers[0]["podSelector"]["matchLabels"], "voxelflow.io/calls-ingest": "true"}
            }
        }
    ]
    labelled = {
        tpl["metadata"]["labels"]["app.kubernetes.io/component"]
        for _, tpl in pod_templates(docs)
        if tpl["metadata"]["labels"].get("voxelflow.io/calls-ingest") == "true"
    }
    assert labelled == {"inference-api", "inference-worker"}


def test_services_listed():
    assert set(PACKAGE_TO_VALUES_KEY.values()) == set(SERVICES)
