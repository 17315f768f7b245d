"""The federated-runs API refuses what cannot run, with the reason, and authenticates and audits every call."""

from __future__ import annotations

from typing import Any

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


def _store_fingerprint(store: Any, version_id: str) -> None:
    """A fingerprint for ``version_id`` as the preprocessing service stores it: four 1 mm cases of up to
    40 x 56 x 44 voxels with two labels."""
    import numpy as np

    from shared.datasets.fingerprint import case_fingerprint, combine, save_version_fingerprint

    rng = np.random.default_rng(0)
    cases = []
    for shape in [(36, 50, 40), (40, 56, 44), (38, 52, 42), (34, 48, 40)]:
        label = np.zeros(shape, dtype=np.int16)
        label[10:20, 10:20, 10:20], label[20:26, 20:26, 20:26] = 1, 2
        cases.append(case_fingerprint(rng.normal(100, 20, shape), label, (1.0, 1.0, 1.0)))
    fingerprint = combine(cases, name="planned", modalities=["MR"], labels={0: "bg", 1: "a", 2: "b"})
    save_version_fingerprint(store, version_id, fingerprint)


def test_a_run_takes_the_fields_its_request_leaves_out_from_the_versions_plan(
    api: Any, agg_ctx: Any, initial_weights: str
) -> None:
    from tests.aggregation.conftest import write_manifest

    version = write_manifest(agg_ctx.store, {"site-a": 3, "site-b": 2, "site-c": 2})  # a version of its own
    request = body(version, initial_weights, training_config={"epochs": 1, "patch": {"size": [32, 32, 32]}})
    no_fingerprint = api.create(**request)
    assert no_fingerprint.status_code == 201, no_fingerprint.text
    assert no_fingerprint.json()["plan_fields"] == []  # a version built before fingerprints: config as given
    _store_fingerprint(agg_ctx.store, version)
    planned = api.create(**request)
    assert planned.status_code == 201, planned.text
    run = planned.json()
    assert {"batch_size", "patch.sampler", "patch.divisible", "network.name", "validation.roi_size"} <= set(
        run["plan_fields"]
    )
    assert "patch.size" not in run["plan_fields"] and "epochs" not in run["plan_fields"]
    config = run["training_config"]
    assert config["patch"]["size"] == [32, 32, 32] and config["patch"]["sampler"] == "whole"  # explicit wins
    assert config["network"]["name"] == "dynunet" and config["validation"]["roi_size"] == [40, 56, 48]
    assert api.get(run["id"])["plan_fields"] == run["plan_fields"]  # persisted
    opted_out = api.create(**{**request, "use_plan": False})
    assert opted_out.status_code == 201 and opted_out.json()["plan_fields"] == []
    assert opted_out.json()["training_config"]["network"]["name"] == "unet"
    for response in (no_fingerprint, planned, opted_out):
        api.client.post(f"/federated-runs/{response.json()['id']}/cancel", headers=api.headers())
