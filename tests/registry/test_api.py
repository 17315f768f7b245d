"""The model-registry REST API on real PostgreSQL (tokens, audit) and MLflow: list, detail, compare, promote."""

from __future__ import annotations

import json

from mlflow import MlflowClient
from sqlalchemy import create_engine, text

from shared.contracts import artifacts
from shared.registry import CHAMPION, register_model_version
from tests.registry.conftest import RegistryService, log_tiny_model, per_case_records, unique_name

GOOD = {f"case-{i:02d}": 0.80 + 0.01 * i for i in range(10)}


def test_promotion_allowed_refused_and_forced(
    registry_service: RegistryService, mlflow_client: MlflowClient, postgres_url: str
) -> None:
    name = unique_name("hippo")
    v1 = register_model_version(log_tiny_model(mlflow_client, seed=5), name, per_case=per_case_records(GOOD))
    worse = {k: v - 0.05 for k, v in GOOD.items()}
    v2 = register_model_version(log_tiny_model(mlflow_client, seed=6), name, per_case=per_case_records(worse))
    operator, admin = registry_service.client("operator"), registry_service.client("admin")
    researcher = registry_service.client("researcher")

    # no champion yet: v1 passes the threshold
    response = operator.post(f"/models/{name}/versions/{v1}/promote")
    assert response.status_code == 200, response.text
    assert response.json()["promoted"] and response.json()["previous_champion"] is None
    assert int(mlflow_client.get_model_version_by_alias(name, CHAMPION).version) == v1

    # v2 is worse on every one of the 10 paired cases: refused with reasons and statistics
    refused = operator.post(f"/models/{name}/versions/{v2}/promote", json={})
    assert refused.status_code == 409
    body = refused.json()
    assert not body["promoted"] and "significantly worse" in body["reasons"][0]
    assert body["statistics"]["wilcoxon"]["n_paired"] == 10 and body["statistics"]["wilcoxon"]["p_value"] < 0.01
    assert int(mlflow_client.get_model_version_by_alias(name, CHAMPION).version) == v1

    # roles: a researcher may not promote; an operator may not force; an admin may, with a reason
    assert researcher.post(f"/models/{name}/versions/{v2}/promote").status_code == 403
    assert (
        operator.post(f"/models/{name}/versions/{v2}/promote", json={"force": True, "reason": "x"}).status_code == 403
    )
    assert admin.post(f"/models/{name}/versions/{v2}/promote", json={"force": True}).status_code == 422
    forced = admin.post(f"/models/{name}/versions/{v2}/promote", json={"force": True, "reason": "hotfix"})
    assert forced.status_code == 200 and forced.json()["forced"] and forced.json()["previous_champion"] == v1
    tags = mlflow_client.get_model_version(name, str(v2)).tags
    assert tags["promotion_forced"] == "true" and tags["promoted_by"].startswith("registry-test-admin")

    assert operator.post(f"/models/{name}/versions/99/promote").status_code == 404
    assert registry_service.client(None).post(f"/models/{name}/versions/{v1}/promote").status_code == 401

    engine = create_engine(postgres_url)
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT role, status_code, object_uids FROM audit_events WHERE path = :p ORDER BY id"),
            {"p": f"/models/{name}/versions/{v2}/promote"},
        ).all()
    engine.dispose()
    assert [(r.role, r.status_code) for r in rows] == [
        ("operator", 409),
        ("researcher", 403),
        ("operator", 403),
        ("admin", 422),
        ("admin", 200),
    ]
    assert "force" in rows[-1].object_uids and f"models:/{name}/{v2}" in rows[-1].object_uids


def test_list_detail_and_compare(registry_service: RegistryService, mlflow_client: MlflowClient) -> None:
    name = unique_name("browse")
    run_a = log_tiny_model(mlflow_client, seed=7)
    v1 = register_model_version(run_a, name, per_case=per_case_records(GOOD))
    v2 = register_model_version(
        log_tiny_model(mlflow_client, seed=8), name, per_case=per_case_records({k: v + 0.01 for k, v in GOOD.items()})
    )
    client = registry_service.client("researcher")

    models = {m["name"]: m for m in client.get("/models").json()}
    assert models[name]["aliases"] == {"candidate": v2} and models[name]["latest_version"] == v2
    versions = client.get(f"/models/{name}/versions").json()
    assert [v["version"] for v in versions] == [v2, v1]

    detail = client.get(f"/models/{name}/versions/{v1}").json()
    assert detail["lineage"]["dataset_version"] == "ds-0123456789abcdef"
    assert detail["lineage"]["preprocessing_hash"] == "a" * 64 and detail["lineage"]["git_sha"]
    assert detail["run"]["run_id"] == run_a and "model/weights.pt" in detail["run"]["artifacts"]
    assert (
        "plots/val_dice.png" in detail["run"]["artifacts"] and "evaluation/per_case.json" in detail["run"]["artifacts"]
    )
    assert detail["per_case_dice"]["case-03"] == GOOD["case-03"]
    assert detail["run"]["ui_url"].startswith("http://127.0.0.1:")

    comparison = client.get(f"/models/{name}/compare", params={"a": v2, "b": v1}).json()
    assert comparison["paired_test"]["n_paired"] == 10
    assert comparison["paired_test"]["mean_difference"] > 0 and comparison["paired_test"]["p_value"] > 0.5
    assert client.get(f"/models/{name}/compare", params={"a": v1, "b": v1}).status_code == 422
    assert client.get(f"/models/{name}/compare", params={"a": v1}).status_code == 422
    assert client.get("/models/no-such-model/versions").status_code == 404
    assert client.get(f"/models/{name}/versions/0").status_code == 422
    assert registry_service.client("pacs").get("/models").status_code == 403


def test_the_robustness_gate_option_reads_the_robustness_report_artifact(
    registry_service: RegistryService, mlflow_client: MlflowClient, postgres_url: str, mlflow_uri: str
) -> None:
    from services.model_registry.main import create_app
    from services.model_registry.settings import ModelRegistrySettings
    from tests.service_harness import serving

    settings = ModelRegistrySettings(
        database_url=postgres_url,
        mlflow_tracking_uri=mlflow_uri,
        log_json=False,
        promotion_min_dice=0.7,
        promotion_max_robustness_drop=0.05,
    )
    name = unique_name("robust")

    def version(seed: int, drop: float | None, text: str | None = None) -> int:
        run_id = log_tiny_model(mlflow_client, seed=seed)
        if drop is not None:  # as `voxelflow evaluate --robustness` writes it
            levels = [(c, lv) for c in ("noise", "fgsm") for lv in (1, 5)]
            rows = [{"corruption": c, "level": lv, "dice": 0.8 - drop, "drop": drop} for c, lv in levels]
            text = json.dumps({"clean_dice": 0.8, "rows": rows, "mean_drop": drop, "case_ids": ["c1", "c2"]})
            mlflow_client.log_metric(run_id, artifacts.ROBUSTNESS_MEAN_DROP, 0.0, step=0)  # the gate ignores it
        if text is not None:
            mlflow_client.log_text(run_id, text, artifacts.ROBUSTNESS_REPORT)
        return register_model_version(run_id, name, per_case=per_case_records(GOOD))

    champion, fragile, unmeasured = version(10, 0.10), version(11, 0.25), version(12, None)
    broken, robust = version(14, None, text="not json"), version(13, 0.12)
    with serving(create_app(settings), "model-registry-robust") as url:
        operator = RegistryService(url, registry_service.tokens).client("operator")
        assert operator.post(f"/models/{name}/versions/{champion}/promote").status_code == 200

        refused = operator.post(f"/models/{name}/versions/{fragile}/promote")
        assert refused.status_code == 409 and "less robust than the champion" in refused.json()["reasons"][0]
        stats = refused.json()["statistics"]["robustness"]
        assert stats["paired_candidate_drop"] == 0.25 and stats["paired_champion_drop"] == 0.10
        assert stats["levels_compared"] == 4

        missing = operator.post(f"/models/{name}/versions/{unmeasured}/promote")
        assert missing.status_code == 409 and "no robustness report" in missing.json()["reasons"][0]
        unreadable = operator.post(f"/models/{name}/versions/{broken}/promote")
        assert unreadable.status_code == 409 and "not a JSON object" in unreadable.json()["reasons"][0]
        assert int(mlflow_client.get_model_version_by_alias(name, CHAMPION).version) == champion

        assert operator.post(f"/models/{name}/versions/{robust}/promote").status_code == 200
    assert int(mlflow_client.get_model_version_by_alias(name, CHAMPION).version) == robust
    # the session's service has the option off: the same fragile version would pass there
    off = registry_service.client("operator").post(f"/models/{name}/versions/{fragile}/promote")
    assert off.status_code == 200 and "robustness" not in off.json()["statistics"]
