"""The federated-runs API refuses what cannot run, with the reason, and authenticates and audits every call."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from shared.db.models import AuditEvent
from tests.aggregation import fake_site_worker as fake


def body(dataset: str, initial_weights: str, **overrides):
    return {
        "dataset_version": dataset,
        "sites": list(fake.SITES),
        "rounds": 1,
        "evaluate": False,
        "initial_weights_key": initial_weights,
        **overrides,
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dataset_version": "ds-nothex"}, "should match pattern"),
        ({"sites": ["Site_A"]}, "should match pattern"),
        ({"sites": ["site-a", "site-a"]}, "unique"),
        ({"min_sites": 4}, "exceeds"),
        ({"fedprox_mu": 0.1}, "fedprox_mu applies only"),
        ({"rounds": 0}, "greater than or equal to 1"),
        ({"privacy": {"clip_norm": 0, "noise_multiplier": 1}}, "greater than 0"),
        ({"strategy": "fedsgd"}, "fedavg"),
        ({"unknown_field": 1}, "Extra inputs"),
        ({"local_norm_layers": True}, "FedBN would change nothing"),  # the default U-Net: instance norm
        ({"early_stopping": {"patience": 2}}, "needs evaluate=true"),
        ({"training_config": {"epochs": 0}}, "greater than 0"),
        ({"training_config": {"unknown": 1}}, "Extra inputs"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(api, dataset, initial_weights, overrides, message):
    response = api.create(**body(dataset, initial_weights, **overrides))
    assert response.status_code == 422, response.text
    assert message in response.text


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dataset_version": "ds-0000000000000000"}, "does not exist"),
        ({"sites": ["site-a", "site-z"]}, "sites without training cases in ds-"),
        ({"initial_weights_key": "nowhere/weights.pt"}, "does not exist in object storage"),
    ],
)
def test_references_to_nothing_are_not_found(api, dataset, initial_weights, overrides, message):
    """A request may be well formed and still name what does not exist: 404, as an unknown id in a path."""
    response = api.create(**body(dataset, initial_weights, **overrides))
    assert response.status_code == 404, response.text
    assert message in response.text


def test_evaluation_is_on_by_default(api, dataset, initial_weights):
    request = body(dataset, initial_weights)
    request.pop("evaluate")
    response = api.create(**request)
    assert response.status_code == 201, response.text
    assert response.json()["evaluate"] is True
    assert api.client.post(f"/federated-runs/{response.json()['id']}/cancel", headers=api.headers()).status_code == 200


def test_auth_roles_and_audit(api, agg_ctx, dataset, initial_weights):
    client = api.client
    assert client.get("/federated-runs").status_code == 401
    assert client.get("/federated-runs", headers=api.headers("pacs")).status_code == 403
    assert (
        client.post("/federated-runs", json=body(dataset, initial_weights), headers=api.headers("pacs")).status_code
        == 403
    )
    assert client.get("/federated-runs/fr-missing", headers=api.headers()).status_code == 404
    # a run nobody works on (no aggregator in this test): create, list, cancel, cancel again
    fake.CURRENT = fake.Behaviour()
    created = api.create(role="operator", **body(dataset, initial_weights))
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    assert created.json()["status"] in ("pending", "running")
    listed = client.get("/federated-runs", headers=api.headers()).json()
    assert run_id in [r["id"] for r in listed]
    cancelled = client.post(f"/federated-runs/{run_id}/cancel", headers=api.headers())
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert client.post(f"/federated-runs/{run_id}/cancel", headers=api.headers()).status_code == 409
    with agg_ctx.session_factory() as session:
        events = list(session.scalars(select(AuditEvent).where(AuditEvent.service == "aggregation")))
    assert any(run_id in e.object_uids and e.method == "POST" and e.outcome == "success" for e in events)
    assert any(e.outcome == "denied" and e.role == "pacs" for e in events)
