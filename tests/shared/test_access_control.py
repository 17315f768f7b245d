"""Token expiry, project scope and authenticated API docs, on a real uvicorn server and PostgreSQL.

The app is the one every service serves (:func:`shared.http.create_service_app`) around a single route, so
what is tested here is exactly the authentication path of ingest, inference and the others.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Depends
from sqlalchemy import select, update

from shared.auth import DEFAULT_TOKEN_LIFETIME, Principal, Role, create_token, parse_duration, role_checker
from shared.cli import main
from shared.db import models
from shared.db.base import make_engine, make_session_factory, run_migrations, session_scope, utcnow
from shared.db.models import ApiToken
from shared.http import create_service_app
from tests.service_harness import serving

PROJECT = "trial-a"


def _router() -> APIRouter:
    router = APIRouter()

    @router.get("/things/{id}")
    def read_thing(
        id: str, caller: Annotated[Principal, Depends(role_checker(Role.RESEARCHER))]
    ) -> dict[str, str | None]:
        return {"id": id, "caller": caller.name, "project": caller.project}

    return router


@pytest.fixture(scope="module")
def session_factory(postgres_url: str) -> Any:
    run_migrations(postgres_url, models.MIGRATIONS, models.VERSION_TABLE)
    return make_session_factory(make_engine(postgres_url))


@contextmanager
def running_app(session_factory: Any, public_api_docs: bool = False) -> Iterator[str]:
    app = create_service_app(
        service="access-test",
        title="access test",
        description="one route behind the shared authentication",
        version="0",
        session_factory=session_factory,
        max_request_bytes=1024,
        body_timeout_seconds=5,
        project=PROJECT,
        public_api_docs=public_api_docs,
        routers=[_router()],
        readiness_checks={},
    )
    with serving(app, "access-test") as url:
        yield url


@pytest.fixture(scope="module")
def url(session_factory: Any) -> Iterator[str]:
    with running_app(session_factory) as base:
        yield base


def _token(session_factory: Any, name: str, **kwargs: Any) -> str:
    with session_scope(session_factory) as session:
        return create_token(session, f"{name}-{utcnow().timestamp()}", Role.RESEARCHER, **kwargs)


def _get(url: str, token: str | None, path: str = "/things/t1") -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(url + path, headers=headers, timeout=30)


def test_a_token_expires_after_its_default_lifetime_with_a_clear_401(url: str, session_factory: Any) -> None:
    secret = _token(session_factory, "expiring")
    assert _get(url, secret).status_code == 200
    with session_scope(session_factory) as session:
        row = session.scalar(select(ApiToken).order_by(ApiToken.id.desc()).limit(1))
        assert row is not None
        lifetime = row.expires_at - row.created_at  # type: ignore[operator]
        assert abs(lifetime - DEFAULT_TOKEN_LIFETIME) < dt.timedelta(seconds=5)
        # the clock moves past the expiry: the same secret is refused, saying why
        session.execute(update(ApiToken).where(ApiToken.id == row.id).values(expires_at=utcnow() - dt.timedelta(1)))
    refused = _get(url, secret)
    assert refused.status_code == 401
    assert "expired at" in refused.json()["detail"] and "voxelflow tokens create" in refused.json()["detail"]
    assert "invalid_token" in refused.headers["www-authenticate"]


def test_a_token_scoped_to_another_project_is_refused(url: str, session_factory: Any) -> None:
    same = _get(url, _token(session_factory, "scoped-a", project=PROJECT))
    assert same.status_code == 200 and same.json()["project"] == PROJECT
    other = _get(url, _token(session_factory, "scoped-b", project="trial-b"))
    assert other.status_code == 403
    assert "scoped to project 'trial-b', not 'trial-a'" in other.json()["detail"]
    assert _get(url, _token(session_factory, "unscoped")).json()["project"] is None  # not scoped: any project
    assert _get(url, _token(session_factory, "forever", expires_in=None)).status_code == 200


def test_cli_creates_a_token_with_a_lifetime_and_a_project(
    url: str, session_factory: Any, postgres_url: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setenv("VOXELFLOW_DATABASE_URL", postgres_url)
    name = f"cli-{utcnow().timestamp()}"
    main(["tokens", "create", "--name", name, "--role", "researcher", "--expires-in", "8h", "--project", PROJECT])
    captured = capsys.readouterr()
    assert "expires in 8h" in captured.err and "project 'trial-a' only" in captured.err
    assert _get(url, captured.out.strip()).status_code == 200
    with session_scope(session_factory) as session:
        row = session.scalar(select(ApiToken).where(ApiToken.name == name))
        assert row is not None and row.project == PROJECT
        assert abs(row.expires_at - row.created_at - dt.timedelta(hours=8)) < dt.timedelta(seconds=5)  # type: ignore[operator]
    with pytest.raises(SystemExit, match="voxelflow tokens create: --expires-in: 'soon' is not a duration"):
        main(["tokens", "create", "--name", name + "-bad", "--expires-in", "soon"])


def test_parse_duration() -> None:
    assert parse_duration("30m") == dt.timedelta(minutes=30)
    assert parse_duration("8h") == dt.timedelta(hours=8)
    assert parse_duration("2w") == dt.timedelta(days=14)
    assert parse_duration("never") is None
    for bad in ("0h", "8", "h", "-1d", "1.5h", "1y"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_api_docs_need_a_token_unless_configured_public(url: str, session_factory: Any) -> None:
    for path in ("/openapi.json", "/docs", "/redoc"):
        refused = _get(url, None, path)
        assert refused.status_code == 401, path
        assert "Basic" in refused.headers["www-authenticate"]  # a browser asks for name and token
    token = _token(session_factory, "docs-reader")
    assert "/things/{id}" in _get(url, token, "/openapi.json").json()["paths"]
    assert _get(url, token, "/docs").status_code == 200
    basic = httpx.get(url + "/openapi.json", auth=("docs-reader", token), timeout=30)
    assert basic.status_code == 200
    assert _get(url, None, "/healthz").status_code == 200  # probes stay public
    with running_app(session_factory, public_api_docs=True) as public:
        assert _get(public, None, "/openapi.json").status_code == 200
        assert _get(public, None, "/docs").status_code == 200
        assert _get(public, None, "/things/t1").status_code == 401  # only the docs became public
