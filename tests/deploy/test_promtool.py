"""The chart's alert rules through Prometheus' own tooling: ``promtool check rules`` on the rules rendered
from the PrometheusRule, and ``promtool test rules`` unit tests (tests/deploy/promtool/) with a firing and a
non-firing case for every alert."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.prometheus import PROMTOOL, rule_groups

UNIT_TESTS = Path(__file__).parent / "promtool" / "alerts_test.yaml"


@pytest.fixture(scope="module")
def rules_dir(rendered, tmp_path_factory) -> Path:
    """rules.yaml (the gpu scenario's PrometheusRule, as the operator hands it to Prometheus) next to the tests."""
    (rule,) = [d for d in rendered["gpu"] if d["kind"] == "PrometheusRule"]
    out = tmp_path_factory.mktemp("promtool")
    (out / "rules.yaml").write_text(yaml.safe_dump(rule_groups(rule), sort_keys=False))
    shutil.copy(UNIT_TESTS, out / UNIT_TESTS.name)
    return out


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_promtool_check_rules_accepts_the_rendered_rules(rules_dir):
    proc = promtool("check", "rules", "rules.yaml", cwd=rules_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    alerts = [r for g in yaml.safe_load((rules_dir / "rules.yaml").read_text())["groups"] for r in g["rules"]]
    assert f"SUCCESS: {len(alerts)} rules found" in proc.stdout


def test_every_alert_has_a_firing_and_a_non_firing_unit_test(rules_dir):
    alerts = {r["alert"] for g in yaml.safe_load((rules_dir / "rules.yaml").read_text())["groups"] for r in g["rules"]}
    cases = [c for t in yaml.safe_load(UNIT_TESTS.read_text())["tests"] for c in t["alert_rule_test"]]
    firing = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert alerts == firing, f"alerts without a firing case: {alerts - firing}; unknown: {firing - alerts}"
    assert alerts <= quiet, f"alerts without a non-firing case: {alerts - quiet}"


def test_promtool_unit_tests_of_the_alerts_pass(rules_dir):
    proc = promtool("test", "rules", UNIT_TESTS.name, cwd=rules_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
