"""Centralised baseline: the same train_local over every site's cases, single process and torchrun DDP (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.cli import main as cli_main
from shared.storage import open_object_store
from shared.training import build_network, load_config
from shared.training.state import state_from_bytes
from tests.service_harness import free_port
from tests.training.datasets import CASE_IDS, write_dataset

REPO = Path(__file__).resolve().parents[2]


def make_store(tmp_path: Path, hippocampus_dir: Path) -> tuple[str, str]:
    url = (tmp_path / "objects").as_uri()
    return url, write_dataset(open_object_store(url), hippocampus_dir, CASE_IDS)


def test_voxelflow_train_uses_all_sites_and_resumes(tmp_path: Path, hippocampus_dir: Path) -> None:
    url, version = make_store(tmp_path, hippocampus_dir)
    out = tmp_path / "central"
    args = ["train", "--dataset", version, "--storage-url", url, "--epochs", "1", "--out", str(out)]
    cli_main(args)
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["num_samples"] == 4  # holdout.train of site-a (3) and site-b (1)
    assert summary["world_size"] == 1
    assert summary["history"][0]["samples"] == 4  # the recipe trains on whole crops: one sample per volume
    assert summary["history"][0]["val_dice"] is not None
    state = state_from_bytes((out / "weights.pt").read_bytes())
    assert set(state) == set(build_network(load_config("hippocampus_unet"), 1, 3).state_dict())
    # a second run with more epochs continues after the checkpointed epoch 1
    cli_main([*args[:-4], "--epochs", "2", "--out", str(out)])
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0] == summary["history"][0]


def test_torchrun_two_processes_gloo(tmp_path: Path, hippocampus_dir: Path) -> None:
    url, version = make_store(tmp_path, hippocampus_dir)
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "shared.training.centralised",
        "--dataset", version, "--storage-url", url, "--epochs", "1", "--out", str(out), "--threads", "1",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["world_size"] == 2
    assert summary["num_samples"] == 4
    # each rank saw half the volumes; the all-reduced count is the whole epoch
    assert summary["history"][0]["samples"] == 4
    assert (out / "weights.pt").exists() and (out / "checkpoint.pt").exists()


def test_voxelflow_train_register_evaluates_holdout_test(
    tmp_path: Path, hippocampus_dir: Path, mlflow_uri: str
) -> None:
    """--register: the baseline is scored on holdout.test and registered with the lineage of a federated
    version (strategy centralised), through the same helpers the aggregator uses."""
    from mlflow import MlflowClient

    from shared.registry import per_case_dice
    from tests.training.datasets import write_split_dataset

    url = (tmp_path / "objects").as_uri()
    parts = {
        "site-a": {"train": CASE_IDS[:2], "val": [CASE_IDS[2]], "test": [CASE_IDS[3]]},
        "site-b": {"train": [CASE_IDS[4]], "val": [], "test": [CASE_IDS[5], CASE_IDS[6]]},
    }
    version = write_split_dataset(open_object_store(url), hippocampus_dir, parts)
    out = tmp_path / "central"
    model_name = f"central-{tmp_path.name}"
    cli_main(
        ["train", "--dataset", version, "--storage-url", url, "--epochs", "1", "--out", str(out), "--threads", "1",
         "--register", "--tracking-uri", mlflow_uri, "--model-name", model_name]
    )  # fmt: skip
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["test"]["test/cases"] == 3.0
    assert 0.0 <= summary["test"]["test/dice_mean"] <= 1.0
    records = json.loads((out / "test-per-case.json").read_text())["records"]
    assert sorted({r["case_id"] for r in records}) == sorted([CASE_IDS[3], CASE_IDS[5], CASE_IDS[6]])
    assert {r["label_name"] for r in records} == {"anterior", "posterior"}

    client = MlflowClient(mlflow_uri, registry_uri=mlflow_uri)
    registered = summary["registered"]
    mv = client.get_model_version_by_alias(model_name, "candidate")
    assert int(mv.version) == registered["version"] and mv.run_id == registered["run_id"]
    assert mv.tags["strategy"] == "centralised" and mv.tags["federated_run_id"] == ""
    assert mv.tags["dataset_version"] == version and mv.tags["git_sha"]
    assert abs(float(mv.tags["test_dice"]) - summary["test"]["test/dice_mean"]) < 1e-5
    per_case = per_case_dice(mv, client)
    assert per_case is not None and set(per_case) == {CASE_IDS[3], CASE_IDS[5], CASE_IDS[6]}
    run = client.get_run(registered["run_id"])
    assert run.data.metrics["test/dice_mean"] == summary["test"]["test/dice_mean"]
    assert "test/anterior/dice_ci_low" in run.data.metrics
    # the test Dice per site: site-a's one test case, site-b's two
    per_site = summary["test_per_site"]
    assert {s: r["cases"] for s, r in per_site.items()} == {"site-a": 1, "site-b": 2}
    assert run.data.metrics["test/site/site-b/dice_mean"] == per_site["site-b"]["dice_mean"]


def test_voxelflow_train_loso_reports_each_held_out_site(
    tmp_path: Path, hippocampus_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--loso: one training per loso-{site} split, each scored on the site it never saw, in loso.json."""

    from tests.training.datasets import write_split_dataset

    url = (tmp_path / "objects").as_uri()
    parts = {
        "site-a": {"train": CASE_IDS[:2], "val": [CASE_IDS[2]]},
        "site-b": {"train": [CASE_IDS[3], CASE_IDS[5]], "val": [CASE_IDS[4]]},
    }
    store = open_object_store(url)
    version = write_split_dataset(store, hippocampus_dir, parts, name="loso", loso=True)
    out = tmp_path / "loso"
    args = ["train", "--dataset", version, "--storage-url", url, "--epochs", "1", "--threads", "1"]
    cli_main([*args, "--out", str(out), "--loso"])
    report = json.loads((out / "loso.json").read_text())
    assert set(report["sites"]) == {"site-a", "site-b"} and report["runs"]["site-a"]["split"] == "loso-site-a"
    assert report["sites"]["site-a"]["cases"] == 3 and report["sites"]["site-b"]["cases"] == 3
    dice = {site: row["dice_mean"] for site, row in report["sites"].items()}
    assert all(0.0 <= d <= 1.0 for d in dice.values())
    assert report["worst_dice"] == min(dice.values()) and report["mean_over_sites"] == pytest.approx(
        sum(dice.values()) / 2
    )
    # each run trained on the other site only and was tested on the held-out one
    run_a = json.loads((out / "loso-site-a" / "metrics.json").read_text())
    assert run_a["num_samples"] == 2 and set(run_a["test_per_site"]) == {"site-a"}
    tested = {r["case_id"] for r in json.loads((out / "loso-site-a" / "test-per-case.json").read_text())["records"]}
    assert tested == set(CASE_IDS[:3])
    assert "held-out site" in capsys.readouterr().out

    # a dataset of one site has no LOSO splits: a one-line message, not a traceback
    single = write_split_dataset(store, hippocampus_dir, {"site-a": parts["site-a"]}, name="one-site", loso=True)
    with pytest.raises(SystemExit, match="no leave-one-site-out splits"):
        cli_main([*args[:2], single, *args[3:], "--out", str(tmp_path / "one"), "--loso"])


def test_voxelflow_train_fills_unset_fields_from_the_versions_plan(tmp_path: Path, hippocampus_dir: Path) -> None:
    """With the version's fingerprint stored (as the preprocessing service does when it builds a version), the
    fields a config leaves out come from the plan and metrics.json lists them; --no-plan and a config that
    sets them all (the bundled default) take nothing from it."""
    import yaml

    from shared.datasets import load_manifest
    from shared.datasets.fingerprint import fingerprint_stored_cases, save_version_fingerprint
    from shared.training.plans import plan_from_fingerprint

    url, version = make_store(tmp_path, hippocampus_dir)
    store = open_object_store(url)
    manifest = load_manifest(store, version)
    fingerprint = fingerprint_stored_cases(
        store, [(c.image_key, c.label_key) for c in manifest.cases], name="test", modality="MR", labels=manifest.labels
    )
    assert fingerprint is not None and fingerprint.case_count == 5
    save_version_fingerprint(store, version, fingerprint)
    plan = plan_from_fingerprint(fingerprint)
    partial = tmp_path / "partial.yaml"
    partial.write_text(yaml.safe_dump({"network": {"name": "unet"}, "epochs": 1, "validation": {"every": 1}}))
    base = ["train", "--dataset", version, "--storage-url", url, "--epochs", "1", "--config", str(partial)]
    cli_main([*base, "--out", str(tmp_path / "planned")])
    summary = json.loads((tmp_path / "planned" / "metrics.json").read_text())
    assert set(summary["plan_fields"]) == {
        "batch_size", "patch.sampler", "patch.size", "patch.divisible", "validation.roi_size"
    }  # fmt: skip
    assert summary["config"]["patch"]["size"] == list(plan.patch_size)
    assert summary["config"]["batch_size"] == plan.batch_size
    assert summary["config"]["network"]["name"] == "unet"  # chosen in the YAML: the plan's DynUNet is not used
    cli_main([*base, "--no-plan", "--out", str(tmp_path / "unplanned")])
    unplanned = json.loads((tmp_path / "unplanned" / "metrics.json").read_text())
    assert unplanned["plan_fields"] == [] and unplanned["config"]["patch"] != summary["config"]["patch"]
    default = ["train", "--dataset", version, "--storage-url", url, "--epochs", "1", "--out", str(tmp_path / "d")]
    cli_main(default)
    assert json.loads((tmp_path / "d" / "metrics.json").read_text())["plan_fields"] == []
