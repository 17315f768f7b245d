"""``/v1/routing-rules`` on the real inference API (PostgreSQL, Redis, S3): CRUD, validation, roles, audit."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from shared.db.models import AuditEvent
from tests.inference.conftest import InferenceService, running_service
from tests.inference.served_models import MovableAliases


@pytest.fixture(scope="module")
def service(base_settings: dict[str, Any]) -> Iterator[InferenceService]:
    settings = {**base_settings, "pacs_url": "http://127.0.0.1:9/dicom-web"}  # stored, never called here
    with running_service(settings, MovableAliases({"champion": "1"})) as svc:
        yield svc


# a site no series of the session comes from: these rules never route anything another test ingests
RULE = {
    "name": "api-test-rule",
    "modality": "mr",
    "series_description_pattern": "(?i)hcrop",
    "site": "routing-api-test-site",
    "model_alias": "champion",
    "destination": "dicom://ORTHANC@127.0.0.1:4242",
}


def test_create_list_replace_delete_and_audit(service: InferenceService) -> None:
    with service.client("operator") as client:
        created = client.post("/v1/routing-rules", json=RULE)
        assert created.status_code == 201, created.text
        rule = created.json()
        assert created.headers["Location"] == f"/v1/routing-rules/{rule['id']}"
        # code strings upper-case, unset criteria NULL (= any), who made it
        assert (rule["modality"], rule["body_part_examined"], rule["enabled"]) == ("MR", None, True)
        assert rule["created_by"].startswith("test-inference-operator")
        assert any(r["id"] == rule["id"] for r in client.get("/v1/routing-rules").json())
        assert client.get(f"/v1/routing-rules/{rule['id']}").json()["name"] == "api-test-rule"

        assert client.post("/v1/routing-rules", json=RULE).status_code == 409  # same name
        replaced = client.put(f"/v1/routing-rules/{rule['id']}", json={**RULE, "enabled": False, "destination": ""})
        assert replaced.status_code == 200, replaced.text
        assert (replaced.json()["enabled"], replaced.json()["destination"]) == (False, None)  # None: pacs_url

        assert client.delete(f"/v1/routing-rules/{rule['id']}").status_code == 204
        assert client.get(f"/v1/routing-rules/{rule['id']}").status_code == 404
        assert client.delete(f"/v1/routing-rules/{rule['id']}").status_code == 404
    with service.ctx.session_factory() as session:
        audits = session.scalars(select(AuditEvent).where(AuditEvent.path.like("/v1/routing-rules%"))).all()
    tagged = [a for a in audits if f"routing-rule:{rule['id']}" in a.object_uids]
    assert {(a.method, a.status_code) for a in tagged} >= {("POST", 201), ("PUT", 200), ("DELETE", 204)}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"series_description_pattern": "(unclosed"}, "does not compile"),
        ({"model_alias": "no-such-alias"}, "not served"),
        ({"destination": "ftp://pacs/x"}, "destination"),
        ({"destination": "dicom://WAY-TOO-LONG-AE-TITLE@host:104"}, "destination"),
        ({"sop_class_uid": "not.a.uid"}, "sop_class_uid"),
        ({"modality": "M\x00R"}, "modality"),
        ({"name": ""}, "name"),
        ({"calling_ae_title": "A" * 17}, "calling_ae_title"),
    ],
)
def test_invalid_rules_are_422_with_the_reason(service: InferenceService, change: dict[str, str], reason: str) -> None:
    with service.client("operator") as client:
        response = client.post("/v1/routing-rules", json={**RULE, "name": "invalid-rule", **change})
    assert response.status_code == 422, response.text
    assert reason in response.text


def test_only_operators_and_admin_manage_rules(service: InferenceService) -> None:
    for role in ("researcher", "pacs"):
        with service.client(role) as client:
            assert client.get("/v1/routing-rules").status_code == 403
            assert client.post("/v1/routing-rules", json={**RULE, "name": f"by-{role}"}).status_code == 403
    with service.client(None) as client:
        assert client.get("/v1/routing-rules").status_code == 401
    with service.client("admin") as client:
        created = client.post("/v1/routing-rules", json={**RULE, "name": "by-admin"})
        assert created.status_code == 201, created.text
        assert client.delete(f"/v1/routing-rules/{created.json()['id']}").status_code == 204
        assert client.get("/v1/routing-rules/0").status_code == 422  # IDs start at 1


def test_cli_creates_lists_and_deletes_rules(
    service: InferenceService, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from shared.cli import main

    monkeypatch.setenv("VOXELFLOW_INFERENCE_API_URL", service.url)
    monkeypatch.setenv("VOXELFLOW_TOKEN", service.tokens["operator"])
    argv = ["routing-rules", "create", "--name", "cli-rule", "--modality", "CT", "--site", "routing-api-test-site"]
    main([*argv, "--description-pattern", "(?i)abdomen", "--destination", "http://127.0.0.1:9/dicom-web"])
    rule_id = int(capsys.readouterr().out.strip())
    main(["routing-rules", "list"])
    line = next(row for row in capsys.readouterr().out.splitlines() if "cli-rule" in row)
    assert line.split()[0] == str(rule_id)
    assert "modality=CT" in line and "description_pattern=(?i)abdomen" in line
    assert "champion → http://127.0.0.1:9/dicom-web" in line
    with pytest.raises(SystemExit) as refused:  # the service's reason in one line (SystemExit(str): exit status 1)
        main(["routing-rules", "create", "--name", "cli-bad", "--description-pattern", "(unclosed"])
    message = str(refused.value.code)
    assert message.startswith("voxelflow routing-rules create: ") and "does not compile" in message
    main(["routing-rules", "delete", str(rule_id)])
    with service.client("operator") as client:
        assert client.get(f"/v1/routing-rules/{rule_id}").status_code == 404
