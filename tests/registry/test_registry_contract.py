"""One contract, every ModelRegistry: the same tests against MLflow over HTTP (the session's real tracking
server: PostgreSQL backend, S3 artifacts) and MLflow on a local file store (``file://`` → SQLite and a
folder), so services can switch registries by URI alone, as they switch object stores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from shared.registry import (
    CANDIDATE,
    CHAMPION,
    LINEAGE_TAGS,
    PER_CASE,
    ModelRegistry,
    RegistryError,
    open_registry,
)
from shared.registry.mlflow_registry import MlflowRegistry
from tests.registry.conftest import (
    LABELS,
    TINY_CONFIG,
    log_tiny_model,
    per_case_records,
    tiny_network_builder,
    unique_name,
)


@pytest.fixture(params=["mlflow-http", "mlflow-file"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> ModelRegistry:
    torch.set_num_threads(1)
    if request.param == "mlflow-file":
        return open_registry((tmp_path / "registry").as_uri())
    return open_registry(request.getfixturevalue("mlflow_uri"))


def test_the_implementation_is_chosen_by_uri_scheme(tmp_path: Path) -> None:
    assert isinstance(open_registry("http://127.0.0.1:1"), MlflowRegistry)
    assert isinstance(open_registry(f"sqlite:///{tmp_path / 'mlflow.db'}"), MlflowRegistry)
    local = open_registry((tmp_path / "reg").as_uri())
    assert isinstance(local, MlflowRegistry) and (tmp_path / "reg" / "mlflow.db").is_file()
    local.ping()
    with pytest.raises(ValueError, match="unsupported registry URI scheme 'ftp'"):
        open_registry("ftp://example.org/registry")


def test_a_training_run_holds_params_metrics_lineage_and_the_model_files(registry: ModelRegistry) -> None:
    run_id = log_tiny_model(registry, experiment=unique_name("contract"))
    assert registry.run_status(run_id) == "FINISHED"
    tags = registry.run_tags(run_id)
    assert tags["dataset_version"] == "ds-0123456789abcdef" and tags["preprocessing_hash"] == "a" * 64
    assert tags["git_sha"] and tags["federated_run_id"] == "fed-test"
    metrics = registry.run_metrics(run_id)
    assert metrics["val_dice"] == pytest.approx(0.4)  # the last step's value
    assert "site/site-a/train_loss" in metrics and "site/site-b/train_loss" in metrics
    assert set(registry.list_artifacts(run_id, "model")) == {
        "model/weights.pt",
        "model/training-config.yaml",
        "model/preprocessing.json",
        "model/labels.json",
    }
    assert set(registry.list_artifacts(run_id, "plots")) == {"plots/train_loss.png", "plots/val_dice.png"}
    with pytest.raises(RegistryError):
        registry.run_tags("0" * 32)


def test_registering_is_idempotent_and_carries_lineage_and_held_out_dice(registry: ModelRegistry) -> None:
    name = unique_name("contract-model")
    run_id = log_tiny_model(registry, experiment=unique_name("contract"))
    dice = {f"case-{i}": 0.5 + 0.05 * i for i in range(4)}
    version = registry.register_evaluated_version(run_id, name, per_case_records(dice), {"note": "contract"})
    assert registry.register_evaluated_version(run_id, name, per_case_records(dice)) == version  # a retried task
    registered = registry.get_version(name, version)
    assert registered.run_id == run_id and registered.uri == f"models:/{name}/{version}"
    assert set(LINEAGE_TAGS) <= set(registered.tags) and registered.tags["note"] == "contract"
    assert float(registered.tags["test_dice"]) == pytest.approx(sum(dice.values()) / 4)
    assert CANDIDATE in registered.aliases
    assert registry.per_case_dice(registered) == pytest.approx(dice)
    assert PER_CASE in registry.list_artifacts(run_id, "evaluation")
    assert registry.run_metrics(run_id)["test/dice_mean"] == pytest.approx(sum(dice.values()) / 4)
    assert [v.version for v in registry.search_versions(name)] == [str(version)]
    assert [v.version for v in registry.search_versions(name, run_id=run_id)] == [str(version)]
    assert registry.search_versions(unique_name("never-registered")) == []
    assert name in [m.name for m in registry.list_models()]
    model = registry.get_model(name)
    assert model.latest_version == version and model.aliases == {CANDIDATE: version}
    assert set(registry.walk_artifacts(run_id)) >= {"model/weights.pt", "plots/val_dice.png", PER_CASE}
    run = registry.get_run(run_id)
    assert run.params["optimizer.lr"] == "0.002" and run.params["rounds"] == "3" and run.experiment_id


def test_a_version_without_evaluation_has_no_per_case_dice(registry: ModelRegistry) -> None:
    name = unique_name("contract-model")
    version = registry.register_evaluated_version(log_tiny_model(registry, experiment=unique_name("c")), name, None)
    assert registry.per_case_dice(registry.get_version(name, version)) is None
    assert registry.get_version(name, version).tags.get("test_dice", "") == ""  # no held-out score


def test_the_robustness_report_is_read_from_its_artifact(registry: ModelRegistry, tmp_path: Path) -> None:
    """What the gate's robustness option reads: None without a report, the report, an error for a bad file."""
    from shared.contracts import artifacts

    name = unique_name("contract-robust")
    versions = [registry.register_version(log_tiny_model(registry, experiment=unique_name("c")), name) for _ in "ab"]
    measured, broken = (registry.get_version(name, v) for v in versions)
    assert registry.robustness_report(measured) is None
    report = {"clean_dice": 0.8, "rows": [{"corruption": "noise", "level": 1, "dice": 0.7, "drop": 0.1}]}
    registry.log_dict(measured.run_id, report, artifacts.ROBUSTNESS_REPORT)
    assert registry.robustness_report(measured) == report
    bad = tmp_path / artifacts.ROBUSTNESS_FILE
    bad.write_text("[1, 2")
    registry.log_artifacts(broken.run_id, bad, artifacts.ROBUSTNESS_DIR)
    assert "not a JSON object" in (registry.robustness_report(broken) or {})["error"]


def test_a_run_without_model_files_is_refused(registry: ModelRegistry) -> None:
    run_id = registry.create_run(unique_name("contract"))
    with pytest.raises(RegistryError, match="lacks"):
        registry.register_version(run_id, unique_name("contract-model"))


def test_aliases_move_resolve_and_are_absent_until_set(registry: ModelRegistry) -> None:
    name = unique_name("contract-model")
    experiment = unique_name("contract")
    v1 = registry.register_version(log_tiny_model(registry, seed=1, experiment=experiment), name)
    v2 = registry.register_version(log_tiny_model(registry, seed=2, experiment=experiment), name)
    assert registry.get_version_by_alias(name, CHAMPION) is None
    assert int(registry.get_version_by_alias(name, CANDIDATE).version) == v2  # the newest registration
    registry.set_alias(name, CHAMPION, v1)
    assert registry.model_aliases(name) == {CANDIDATE: str(v2), CHAMPION: str(v1)}
    assert int(registry.resolve(f"models:/{name}@{CHAMPION}").version) == v1
    assert int(registry.resolve(f"models:/{name}/{v2}").version) == v2
    registry.set_alias(name, CHAMPION, v2)
    assert int(registry.resolve(f"models:/{name}@champion").version) == v2
    for bad in (f"models:/{name}@nobody", f"models:/{name}/99", f"models:/{unique_name('none')}/1"):
        with pytest.raises(RegistryError):
            registry.resolve(bad)
    with pytest.raises(RegistryError, match="malformed"):
        registry.resolve(f"models:/{name}")
    with pytest.raises(RegistryError):
        registry.model_aliases(unique_name("none"))


def test_attached_exports_and_the_loaded_model(registry: ModelRegistry, tmp_path: Path) -> None:
    name = unique_name("contract-model")
    run_id = log_tiny_model(registry, seed=4, experiment=unique_name("contract"))
    version = registry.register_version(run_id, name)
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "model.onnx").write_bytes(b"onnx bytes")
    (tmp_path / "report.json").write_text(json.dumps({"max_abs_diff": 0.0}))
    assert registry.attach_artifact(name, version, tmp_path / "onnx", "model/onnx") == "model/onnx"
    assert registry.attach_artifact(name, version, tmp_path / "report.json", "model") == "model/report.json"
    assert registry.list_artifacts(run_id, "model/onnx") == ["model/onnx/model.onnx"]
    downloaded = registry.download_artifacts(run_id, "model/onnx/model.onnx", tmp_path / "down")
    assert downloaded.read_bytes() == b"onnx bytes"
    with pytest.raises(FileNotFoundError):
        registry.attach_artifact(name, version, tmp_path / "missing.onnx", "model")
    with pytest.raises(RegistryError):
        registry.download_artifacts(run_id, "model/absent.bin", tmp_path / "down")

    loaded = registry.load_model(f"models:/{name}@{CANDIDATE}", network_builder=tiny_network_builder)
    torch.manual_seed(4)
    expected = tiny_network_builder(yaml.safe_dump(TINY_CONFIG), 1, len(LABELS)).state_dict()
    assert loaded.labels == LABELS and loaded.uri == f"models:/{name}/{version}"
    assert all(torch.equal(loaded.network.state_dict()[k], v) for k, v in expected.items())
    assert not loaded.network.training


def test_tracking_runs_by_tag_repeated_points_and_failure(registry: ModelRegistry) -> None:
    experiment = unique_name("contract")
    assert registry.find_runs(experiment, "federated_run_id", "fed-1") == []  # no experiment yet
    run_id = registry.create_run(experiment, run_name="fed-1", tags={"federated_run_id": "fed-1"})
    assert registry.ensure_experiment(experiment) == registry.ensure_experiment(experiment)
    assert registry.find_runs(experiment, "federated_run_id", "fed-1") == [run_id]
    assert registry.find_runs(experiment, "federated_run_id", "fed-2") == []
    registry.log_params(run_id, {"rounds": "3", "long": "x" * 7000})
    registry.log_params(run_id, {"rounds": "3"})  # a resumed run re-logs the same value
    registry.log_metrics(run_id, [("val_dice", 0.5, 1), ("val_dice", 0.6, 2)])
    registry.log_metrics(run_id, [("val_dice", 0.6, 2)])  # the same round again after a crash
    assert registry.run_metrics(run_id)["val_dice"] == pytest.approx(0.6)
    registry.set_run_tag(run_id, "failure_reason", "site lost")
    registry.end_run(run_id, "FAILED")
    assert registry.run_status(run_id) == "FAILED" and registry.run_tags(run_id)["failure_reason"] == "site lost"


def test_a_version_is_found_by_its_tag(registry: ModelRegistry) -> None:
    name = unique_name("contract-model")
    run_id = log_tiny_model(registry, experiment=unique_name("contract"))
    assert registry.find_version_by_tag(name, "federated_run_id", "fed-x") is None
    version = registry.register_version(run_id, name, {"federated_run_id": "fed-x"})
    registry.set_version_tag(name, version, "promoted_by", "contract")
    found = registry.find_version_by_tag(name, "federated_run_id", "fed-x")
    assert found is not None and int(found.version) == version and found.tags["promoted_by"] == "contract"
