"""Fixtures of the fuzz stage: every HTTP service running on the session's real servers, with a token of
each role. The services' own fixtures are reused (imported here so that pytest registers them)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.aggregation.conftest import aggregation_env  # noqa: F401  (fixture)
from tests.inference.conftest import base_settings  # noqa: F401  (fixture)
from tests.ingest.conftest import IngestService, ingest_env, ingest_service  # noqa: F401  (fixtures)
from tests.preprocessing.service_fixtures import preprocessing_env, preprocessing_service  # noqa: F401
from tests.registry.conftest import registry_service  # noqa: F401  (fixture)
from tests.service_harness import serving, tokens_for_every_role


@dataclass
class FuzzTarget:
    name: str
    url: str
    tokens: dict[str, str]  # role -> bearer token


@pytest.fixture(scope="session")
def aggregation_service(aggregation_env: dict[str, str]) -> Iterator[FuzzTarget]:  # noqa: F811
    """The aggregation API over real HTTP (its own tests drive it in-process)."""
    from services.aggregation.main import create_app

    app = create_app()
    with serving(app, "aggregation") as url:
        yield FuzzTarget("aggregation", url, tokens_for_every_role(app.state.ctx.session_factory, "fuzz-agg"))


@pytest.fixture(scope="session")
def inference_service(base_settings: dict, ingest_service: IngestService) -> Iterator[FuzzTarget]:  # noqa: F811
    """The inference API with a small served U-Net, reading series from the fuzz stage's ingest."""
    from tests.inference.conftest import running_service
    from tests.inference.served_models import MovableAliases

    settings = {
        **base_settings,
        "sync_max_voxels": 200_000,
        "ingest_url": ingest_service.url,
        "ingest_token": ingest_service.tokens["researcher"],
    }
    with running_service(settings, MovableAliases({"champion": "1"})) as svc:
        yield FuzzTarget("inference", svc.url, dict(svc.tokens))


def target_for(request: pytest.FixtureRequest, name: str) -> FuzzTarget:
    """The running service ``name`` (started on first use)."""
    if name in ("aggregation", "inference"):
        return request.getfixturevalue(f"{name}_service")
    fixture = {
        "ingest": "ingest_service",
        "preprocessing": "preprocessing_service",
        "model_registry": "registry_service",
    }
    service = request.getfixturevalue(fixture[name])
    return FuzzTarget(name, service.url, dict(service.tokens))


__all__ = ["FuzzTarget", "IngestService", "target_for"]
