"""shared.registry against a real MLflow server (PostgreSQL backend, S3 artifacts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from shared.registry import (
    CANDIDATE,
    CHAMPION,
    RegistryError,
    attach_artifact,
    get_version_by_alias,
    load_model,
    parse_model_uri,
    per_case_dice,
    register_model_version,
    set_alias,
)
from tests.registry.conftest import LABELS, SPEC, log_tiny_model, per_case_records, tiny_network_builder, unique_name


def test_run_and_version_carry_lineage(mlflow_client: MlflowClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOXELFLOW_GIT_SHA", "0123abcd" * 5)
    run_id = log_tiny_model(mlflow_client, seed=1)
    run = mlflow_client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["git_sha"] == "0123abcd" * 5 and run.data.tags["dataset_version"] == "ds-0123456789abcdef"
    assert run.data.params["optimizer.lr"] == "0.002" and run.data.params["preprocessing_hash"] == "a" * 64
    history = mlflow_client.get_metric_history(run_id, "site/site-b/train_loss")
    assert [(m.step, round(m.value, 6)) for m in history] == [(0, 1.45), (1, 1.35), (2, 1.25)]
    artifacts = {f.path for d in ("model", "plots") for f in mlflow_client.list_artifacts(run_id, d)}
    assert {"model/weights.pt", "model/training-config.yaml", "model/preprocessing.json", "model/labels.json"} <= (
        artifacts
    )
    assert {"plots/train_loss.png", "plots/val_dice.png"} <= artifacts

    name = unique_name("lineage")
    dice = {f"hippocampus_{i:03d}": 0.7 + 0.02 * i for i in range(6)}
    version = register_model_version(run_id, name, {"note": "test"}, per_case=per_case_records(dice))
    mv = mlflow_client.get_model_version(name, str(version))
    assert mv.source.endswith(f"{run_id}/artifacts/model") and mv.run_id == run_id
    assert mv.tags["git_sha"] == "0123abcd" * 5 and mv.tags["federated_run_id"] == "fed-test"
    assert mv.tags["strategy"] == "fedavg" and mv.tags["note"] == "test"
    assert float(mv.tags["test_dice"]) == pytest.approx(sum(dice.values()) / 6)
    assert per_case_dice(mv, mlflow_client) == pytest.approx(dice)
    assert CANDIDATE in mv.aliases
    # idempotent: registering the same run again returns the same version (a retried task)
    assert register_model_version(run_id, name, per_case=per_case_records(dice)) == version
    assert len(mlflow_client.search_model_versions(f"name = '{name}'")) == 1


def test_aliases_and_load_model_round_trip(mlflow_client: MlflowClient, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    name = unique_name("roundtrip")
    v1 = register_model_version(log_tiny_model(mlflow_client, seed=2), name)
    v2 = register_model_version(log_tiny_model(mlflow_client, seed=3), name)
    assert (v1, v2) == (1, 2)
    assert get_version_by_alias(name, CHAMPION, mlflow_client) is None
    set_alias(name, CHAMPION, v1, client=mlflow_client)
    assert int(get_version_by_alias(name, CANDIDATE, mlflow_client).version) == v2

    champion = load_model(f"models:/{name}@{CHAMPION}", mlflow_client)
    by_number = load_model(f"models:/{name}/{v1}", mlflow_client)
    candidate = load_model(f"models:/{name}@{CANDIDATE}", mlflow_client)
    assert champion.labels == LABELS and champion.spec_dict == SPEC and champion.uri == f"models:/{name}/1"

    torch.manual_seed(2)  # the same seed as the logged network: rebuild it and compare outputs
    original = tiny_network_builder(champion.training_config_yaml, 1, 3).eval()
    image = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        expected = original(image)
        assert torch.equal(champion.network(image), expected)
        assert torch.equal(by_number.network(image), expected)
        assert not torch.allclose(candidate.network(image), expected)  # another version, other weights

    export = tmp_path / "model.onnx"
    export.write_bytes(b"onnx bytes")
    assert attach_artifact(name, v1, export, "model/onnx", client=mlflow_client) == "model/onnx/model.onnx"
    assert [f.path for f in mlflow_client.list_artifacts(champion.version.run_id, "model/onnx")] == [
        "model/onnx/model.onnx"
    ]


def test_bad_uris_and_missing_versions_are_clear_errors(mlflow_client: MlflowClient) -> None:
    assert parse_model_uri("models:/hippo@champion") == ("hippo", None, "champion")
    assert parse_model_uri("models:/hippo/12") == ("hippo", "12", None)
    for bad in ("runs:/abc/model", "models:/hippo", "models:/hippo/latest", "models:/@champion"):
        with pytest.raises(RegistryError, match="URI"):
            parse_model_uri(bad)
    with pytest.raises(RegistryError, match="models:/no-such-model-xyz/1"):
        load_model("models:/no-such-model-xyz/1", mlflow_client)
    run = mlflow_client.create_run(mlflow_client.get_experiment_by_name("registry-tests").experiment_id)
    with pytest.raises(RegistryError, match="lacks"):
        register_model_version(run.info.run_id, unique_name("empty"))


def test_per_case_json_is_valid_json_with_undefined_metrics(mlflow_client: MlflowClient, tmp_path: Path) -> None:
    run_id = log_tiny_model(mlflow_client, seed=4)
    records = per_case_records({"c1": 0.8, "c2": 0.9})
    records[0]["hd95"] = float("nan")
    register_model_version(run_id, unique_name("nan"), per_case=records)
    path = mlflow_client.download_artifacts(run_id, "evaluation/per_case.json", str(tmp_path))
    data = json.loads(Path(path).read_text())  # strict JSON: NaN would be invalid
    assert data["records"][0]["hd95"] is None and data["cases"] == {"c1": 0.8, "c2": 0.9}
