"""A streaming response (the server-sent events of ``GET /federated-runs/{id}/events``) may run far longer
than the request-body deadline: once the (empty) body is in, the middleware must not time out the
disconnect listener a StreamingResponse keeps open, or every live stream is cut after
``body_timeout_seconds`` (it was: 60 s by default)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
import httpx
import pytest
from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from shared.auth import Principal, Role, create_token, role_checker
from shared.db import models
from shared.db.base import make_engine, make_session_factory, run_migrations, session_scope
from shared.http import create_service_app
from tests.service_harness import serving

BODY_TIMEOUT_SECONDS = 1.0
CHUNKS = 5
CHUNK_INTERVAL_SECONDS = 0.5  # the whole stream lasts 2.5x the body deadline


def _router() -> APIRouter:
    router = APIRouter()

    @router.get("/ticks")
    async def ticks(_: Annotated[Principal, Depends(role_checker(Role.RESEARCHER))]) -> StreamingResponse:
        async def produce() -> AsyncIterator[bytes]:
            for index in range(CHUNKS):
                yield f"data: {index}\n\n".encode()
                await anyio.sleep(CHUNK_INTERVAL_SECONDS)  # a slow producer, like a training epoch

        return StreamingResponse(produce(), media_type="text/event-stream")

    return router


@pytest.fixture(scope="module")
def session_factory(postgres_url: str) -> Any:
    run_migrations(postgres_url, models.MIGRATIONS, models.VERSION_TABLE)
    return make_session_factory(make_engine(postgres_url))


def test_a_stream_outlives_the_body_deadline(session_factory: Any) -> None:
    app = create_service_app(
        service="stream-test",
        title="stream test",
        description="one streaming route behind the shared middleware",
        version="0",
        session_factory=session_factory,
        max_request_bytes=1024,
        body_timeout_seconds=BODY_TIMEOUT_SECONDS,
        routers=[_router()],
        readiness_checks={},
    )
    with session_scope(session_factory) as session:
        token = create_token(session, "stream-reader", Role.RESEARCHER)
    headers = {"Authorization": f"Bearer {token}"}
    with serving(app, "stream-test") as url, httpx.stream("GET", url + "/ticks", headers=headers, timeout=30) as reply:
        assert reply.status_code == 200
        body = b"".join(reply.iter_bytes())
    assert body.decode().split() == [part for index in range(CHUNKS) for part in ("data:", str(index))]
