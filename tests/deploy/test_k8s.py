"""k8s/: the committed plain manifests equal a fresh render of the chart; overlays build and validate."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT
from .k8s_helpers import CRD_KINDS, containers, pod_templates

OVERLAYS = ["dev-cpu", "prod-gpu"]


def test_render_is_up_to_date(tools):
    env = dict(os.environ, VOXELFLOW_PYTHON=sys.executable, HELM=str(tools["helm"]))
    proc = subprocess.run([str(ROOT / "k8s" / "render.sh"), "--check"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr + "\nRun k8s/render.sh and commit the result."


def test_base_has_no_secrets_or_helm_leftovers():
    text = (ROOT / "k8s" / "base" / "voxelflow.yaml").read_text()
    docs = [d for d in yaml.safe_load_all(text) if d]
    assert not [d for d in docs if d["kind"] == "Secret"], "plain manifests must not carry generated credentials"
    assert "helm.sh/" not in text and "managed-by: Helm" not in text


@pytest.fixture(scope="module")
def overlays(tools) -> dict[str, list[dict]]:
    out = {}
    for overlay in OVERLAYS:
        proc = subprocess.run(
            [str(tools["kubectl"]), "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        out[overlay] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates(overlays, overlay, tmp_path):
    docs = [d for d in overlays[overlay] if d["kind"] not in CRD_KINDS]
    f = tmp_path / f"{overlay}.yaml"
    f.write_text(yaml.safe_dump_all(docs))
    exe = Path(sys.executable).with_name("kubernetes-validate")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "kubernetes_validate"]
    proc = subprocess.run([*cmd, "--strict", "-k", "1.34.0", str(f)], capture_output=True, text=True)
    assert proc.returncode == 0 and "ERROR" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_dev_overlay(overlays):
    docs = overlays["dev-cpu"]
    assert {d["metadata"]["namespace"] for d in docs} == {"voxelflow-dev"}
    dimse = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "voxelflow-ingest-dimse")
    assert dimse["spec"]["type"] == "NodePort"


def test_prod_gpu_overlay(overlays):
    docs = overlays["prod-gpu"]
    gpu = {}
    for wl, tpl in pod_templates(docs):
        for c in containers(tpl):
            if "nvidia.com/gpu" in c["resources"].get("limits", {}):
                gpu[wl["metadata"]["name"]] = c
    assert set(gpu) == {
        "voxelflow-triton",
        "voxelflow-inference-worker",
        "voxelflow-training-worker-site-a",
        "voxelflow-training-worker-site-b",
    }
    assert "--allow-gpu-metrics=true" in gpu["voxelflow-triton"]["args"]
    assert gpu["voxelflow-inference-worker"]["image"].endswith("-cuda")
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    for scaler in (d for d in docs if d["kind"] in {"HorizontalPodAutoscaler", "ScaledObject"}):
        target = deployments[scaler["spec"]["scaleTargetRef"]["name"]]
        assert "replicas" not in target["spec"], f"{target['metadata']['name']} pins replicas under a scaler"
