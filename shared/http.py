"""The HTTP side every service shares: app factory, request middleware, health and metrics endpoints.

One ASGI middleware does the per-request bookkeeping that must never be forgotten by a route:
request ID, body-size limit (413), access log, Prometheus metrics by route template, and an audit row
(who, role, method, path, object UIDs, outcome, time) in the database.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import anyio
from fastapi import APIRouter, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared import audit
from shared.auth import Principal, TokenAuthenticator
from shared.observability import metrics
from shared.observability.logging import request_id_var
from shared.openapi import EDGE_RESPONSES, document_edge_responses
from shared.settings import VoxelflowSettings

log = logging.getLogger("voxelflow.http")

# Probes and scrapes carry no data and are hit every few seconds: neither authenticated nor audited.
UNAUDITED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
ReadinessCheck = Callable[[], None]


# The interactive API docs and the schema: they list every route and parameter, so they need a token like
# any other path unless VOXELFLOW_PUBLIC_API_DOCS=true (a local stack). A browser gets the Basic challenge
# and sends `name:token` for /docs and the /openapi.json it then fetches.
API_DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
#: never authenticated: probes and scrapes
PUBLIC_PATHS = UNAUDITED_PATHS


def public_paths(public_api_docs: bool) -> frozenset[str]:
    """The paths served without a token: probes, plus the API docs when they are configured public."""
    return PUBLIC_PATHS | API_DOCS_PATHS if public_api_docs else PUBLIC_PATHS


DEFAULT_BODY_TIMEOUT_SECONDS = 60.0


class RequestTooLargeError(Exception):
    pass


class RequestBodyTimeoutError(Exception):
    """The client did not send its whole body in time (a slow or stalled client holding a worker)."""


def add_audit_uids(request: Request, *uids: str | None) -> None:
    """Routes call this to name the objects a request touched beyond its path parameters."""
    request.state.audit_uids = [*getattr(request.state, "audit_uids", []), *(u for u in uids if u)]


def _outcome(status_code: int) -> str:
    if status_code in (401, 403):
        return "denied"
    if status_code >= 500:
        return "error"
    if status_code >= 400:
        return "rejected"
    return "success"


class ObservedRequestMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        service: str,
        session_factory: sessionmaker[Session],
        max_request_bytes: int,
        body_timeout_seconds: float = DEFAULT_BODY_TIMEOUT_SECONDS,
    ):
        self.app = app
        self.service = service
        self.session_factory = session_factory
        self.max_request_bytes = max_request_bytes
        self.body_timeout_seconds = body_timeout_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})
        started = time.perf_counter()
        status_holder = {"status": 500, "sent": False}
        received = 0
        body_deadline: float | None = None
        body_complete = False
        metrics.http_requests_in_progress.labels(self.service).inc()

        async def limited_receive() -> Message:
            nonlocal received, body_deadline, body_complete
            if body_complete:
                # The body is in: what is left to receive is the client's disconnect, which a streaming
                # response (server-sent events) listens for as long as it runs; no deadline applies to it.
                return await receive()
            declared = headers.get("content-length")
            if received == 0 and declared is not None and declared.isdigit() and int(declared) > self.max_request_bytes:
                # Decided when the body is first read, so after authentication (AuthenticateFirstMiddleware).
                await answer_and_stop(413, f"request body exceeds the {self.max_request_bytes}-byte limit")
                raise RequestTooLargeError
            if body_deadline is None:
                body_deadline = time.monotonic() + self.body_timeout_seconds
            try:
                with anyio.fail_after(max(0.0, body_deadline - time.monotonic())):
                    message = await receive()
            except TimeoutError:
                await answer_and_stop(408, f"the request body was not received within {self.body_timeout_seconds:g} s")
                raise RequestBodyTimeoutError from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_complete = not message.get("more_body", False)
                if received > self.max_request_bytes:
                    await answer_and_stop(413, f"request body exceeds the {self.max_request_bytes}-byte limit")
                    raise RequestTooLargeError
            return message

        async def answer_and_stop(status_code: int, detail: str) -> None:
            """Answer at once, whatever the route makes of the exception raised next (FastAPI turns an error
            while reading a JSON body into a 400); what the app sends after this is dropped."""
            if status_holder["sent"]:
                return
            response = JSONResponse({"detail": detail}, status_code=status_code, headers={"Connection": "close"})
            await response(scope, receive, observed_send)
            status_holder["final"] = True

        async def observed_send(message: Message) -> None:
            if status_holder.get("final"):
                return
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["sent"] = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, limited_receive, observed_send)
        except (RequestBodyTimeoutError, RequestTooLargeError):
            if not status_holder.get("final"):
                raise  # the response had already begun: nothing better than aborting it
        finally:
            elapsed = time.perf_counter() - started
            metrics.http_requests_in_progress.labels(self.service).dec()
            route = scope.get("route")
            route_template = getattr(route, "path", None) or "unmatched"
            status_code = int(status_holder["status"])
            method = scope["method"]
            metrics.http_requests_total.labels(self.service, method, route_template, str(status_code)).inc()
            metrics.http_request_duration_seconds.labels(self.service, method, route_template).observe(elapsed)
            log.info(
                "request",
                extra={
                    "method": method,
                    "path": scope["path"],
                    "status": status_code,
                    "duration_ms": round(elapsed * 1000, 1),
                },
            )
            if scope["path"] not in UNAUDITED_PATHS:
                await anyio.to_thread.run_sync(self._write_audit, scope, request_id, status_code)
            request_id_var.reset(token)

    def _write_audit(self, scope: Scope, request_id: str, status_code: int) -> None:
        state = scope.get("state", {})
        principal: Principal | None = state.get("principal")
        uids = [str(v) for k, v in scope.get("path_params", {}).items() if k.endswith("uid") or k == "id"]
        uids += state.get("audit_uids", [])
        client = scope.get("client")
        audit.record(
            self.session_factory,
            service=self.service,
            request_id=request_id,
            principal=principal.name if principal else None,
            role=principal.role.value if principal else None,
            method=scope["method"],
            path=scope["path"],
            object_uids=uids,
            status_code=status_code,
            outcome=_outcome(status_code),
            client=f"{client[0]}:{client[1]}" if client else None,
        )


class AuthenticateFirstMiddleware:
    """Authenticate every non-public request before anything reads its body.

    FastAPI parses and validates a body (422), and ObservedRequestMiddleware checks its size (413), before a
    route's auth dependency runs: an anonymous caller could learn about the API's validation and have its
    request audited without a principal. Here a missing or unknown token is 401 before the body is touched;
    the route's :func:`shared.auth.role_checker` then decides the role (403) from the principal found here.
    """

    def __init__(self, app: ASGIApp, public_paths: frozenset[str] = PUBLIC_PATHS):
        self.app = app
        self.public_paths = public_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.public_paths:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        authenticator: TokenAuthenticator = scope["app"].state.authenticator
        try:
            await anyio.to_thread.run_sync(authenticator.authenticate, request)
        except HTTPException as exc:
            response = JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def health_router(readiness_checks: dict[str, ReadinessCheck]) -> APIRouter:
    """``/healthz``: the process is alive. ``/readyz``: every dependency answers and the service is loaded."""
    router = APIRouter(tags=["health"])

    @router.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz", include_in_schema=False)
    def readyz(request: Request) -> JSONResponse:
        failures: dict[str, str] = {}
        if not getattr(request.app.state, "ready", False):
            failures["startup"] = "not finished"
        for name, check in readiness_checks.items():
            try:
                check()
            except Exception as exc:
                failures[name] = f"{type(exc).__name__}: {exc}"[:300]
        if failures:
            return JSONResponse({"status": "not ready", "failures": failures}, status_code=503)
        return JSONResponse({"status": "ready"})

    @router.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return router


def create_service_app(
    *,
    service: str,
    title: str,
    description: str,
    version: str,
    session_factory: sessionmaker[Session],
    max_request_bytes: int,
    body_timeout_seconds: float | None = None,
    project: str | None = None,
    public_api_docs: bool = False,
    routers: Sequence[APIRouter],
    readiness_checks: dict[str, ReadinessCheck],
    startup: Sequence[Callable[[], None]] = (),
    shutdown: Sequence[Callable[[], None]] = (),
) -> FastAPI:
    """The FastAPI app every service serves: probes, metrics, auth, audit and the body limit around its routers.

    ``startup`` steps (migrations, model loading) run in a worker thread, in order, before ``/readyz`` can
    turn true; ``shutdown`` steps run after it has turned false again.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for step in startup:
            await anyio.to_thread.run_sync(step)
        app.state.ready = True
        try:
            yield
        finally:
            app.state.ready = False
            for step in shutdown:
                await anyio.to_thread.run_sync(step)

    app = FastAPI(title=title, description=description, version=version, lifespan=lifespan)
    app.state.ready = False
    app.state.authenticator = TokenAuthenticator(session_factory, project)
    app.include_router(health_router(readiness_checks))
    for router in routers:
        app.include_router(router)
    document_edge_responses(app, PUBLIC_PATHS | API_DOCS_PATHS)
    # inside the observer: a 401 is still logged and audited
    app.add_middleware(AuthenticateFirstMiddleware, public_paths=public_paths(public_api_docs))
    if body_timeout_seconds is None:
        body_timeout_seconds = VoxelflowSettings().api_body_timeout_seconds
    app.add_middleware(
        ObservedRequestMiddleware,
        service=service,
        session_factory=session_factory,
        max_request_bytes=max_request_bytes,
        body_timeout_seconds=body_timeout_seconds,
    )
    return app


__all__ = [
    "API_DOCS_PATHS",
    "EDGE_RESPONSES",
    "PUBLIC_PATHS",
    "AuthenticateFirstMiddleware",
    "RequestBodyTimeoutError",
    "RequestTooLargeError",
    "add_audit_uids",
    "create_service_app",
    "document_edge_responses",
    "health_router",
    "public_paths",
]
