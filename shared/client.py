"""A small HTTP client of the platform's APIs, what the CLI and the demo use (and a user's script may).

Why here and not in each caller: every call to a voxelflow API can fail the same few ways (service not
running, token missing or refused, wrong role, unknown ID, refused input); :class:`ApiError` turns each into
one sentence that says what to do, so the CLI prints a line instead of a traceback.

Where a service is: ``VOXELFLOW_<SERVICE>_API_URL`` (e.g. ``VOXELFLOW_PREPROCESSING_API_URL``), else the
local stack's port for it (``make up STACK_ARGS=--with-services``). The token: ``VOXELFLOW_TOKEN``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import httpx

from shared.datasets.msd import case_id_of, read_msd_index

#: the services with an HTTP API, by the name the local stack gives their API process
SERVICES = ("ingest", "preprocessing", "aggregation", "model-registry", "inference")
TOKEN_HINT = "create one with `voxelflow tokens create --name me --role operator` and export VOXELFLOW_TOKEN"


class ApiError(RuntimeError):
    """A call to a voxelflow API failed; the message says why and what to do."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def service_url(service: str, environ: dict[str, str] | None = None) -> str:
    """Base URL of ``service``'s API: its variable, else where the local stack runs it."""
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r}; one of {', '.join(SERVICES)}")
    env = os.environ if environ is None else environ
    variable = f"VOXELFLOW_{service.upper().replace('-', '_')}_API_URL"
    if env.get(variable):
        return env[variable].rstrip("/")
    from shared.stack import Stack, StackConfig

    return Stack(StackConfig.from_env(dict(env)), log=lambda _: None).components[f"{service}-api"].url


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):  # FastAPI's validation errors: field and message
        return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', [])[1:])}: {e.get('msg')}" for e in detail[:5])
    if isinstance(detail, dict):
        reasons = detail.get("reasons")
        return "; ".join(reasons) if reasons else str(detail)
    return str(detail)


@dataclass(frozen=True)
class ServerEvent:
    """One Server-Sent Event: its id (None for an event without one), its type and its decoded JSON data."""

    id: str | None
    kind: str
    data: Any


def parse_sse(lines: Iterator[str]) -> Iterator[ServerEvent]:
    """The events of a text/event-stream, line by line (comments skipped, multi-line data joined)."""
    fields: dict[str, str] = {}
    for line in lines:
        if not line:
            if "data" in fields:
                yield ServerEvent(fields.get("id"), fields.get("event", "message"), json.loads(fields["data"]))
            fields = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        fields[name] = f"{fields[name]}\n{value}" if name == "data" and name in fields else value


class ServiceClient:
    """One service's API with the caller's token; every method returns the decoded JSON or raises ApiError."""

    def __init__(self, service: str, token: str | None = None, url: str | None = None, timeout: float = 120) -> None:
        self.service = service
        self.url = (url or service_url(service)).rstrip("/")
        token = token if token is not None else os.environ.get("VOXELFLOW_TOKEN")
        if not token:
            raise ApiError(f"no API token for the {service} API: {TOKEN_HINT}")
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout)

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def request(self, method: str, path: str, *, expected: tuple[int, ...] = (200,), **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise ApiError(
                f"the {self.service} API at {self.url} is not reachable: start the stack with "
                f"`make up STACK_ARGS=--with-services`, or point VOXELFLOW_{self.service.upper().replace('-', '_')}"
                "_API_URL at a running one"
            ) from None
        except httpx.TimeoutException:
            raise ApiError(f"the {self.service} API at {self.url} did not answer {method} {path} in time") from None
        if response.status_code in expected:
            return response.json() if response.content else None
        self._raise(response, method, path)

    def _raise(self, response: httpx.Response, method: str, path: str) -> NoReturn:
        status, detail = response.status_code, _detail(response)
        if status == 401:
            raise ApiError(f"the {self.service} API refused the token ({detail}): {TOKEN_HINT}", status)
        if status == 403:
            raise ApiError(f"the token's role may not {method} {path} on the {self.service} API: {detail}", status)
        raise ApiError(f"{method} {path} → {status}: {detail}", status)

    def events(self, path: str, last_event_id: str | None = None) -> Iterator[ServerEvent]:
        """Follow a Server-Sent Events endpoint until the server ends the stream (no read timeout: a quiet
        stream is a slow run, and the server sends a comment every second or so anyway)."""
        headers = {"Accept": "text/event-stream", **({"Last-Event-ID": last_event_id} if last_event_id else {})}
        timeout = httpx.Timeout(self.http.timeout.connect, read=None)
        try:
            with self.http.stream("GET", path, headers=headers, timeout=timeout) as response:
                if response.status_code != 200:
                    response.read()
                    self._raise(response, "GET", path)
                yield from parse_sse(response.iter_lines())
        except httpx.ConnectError:
            raise ApiError(f"the {self.service} API at {self.url} is not reachable") from None

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> Any:
        return self.request("PUT", path, **kwargs)

    def wait(
        self,
        path: str,
        done: Callable[[dict[str, Any]], bool],
        timeout: float,
        what: str,
        interval: float = 1.0,
        on_poll: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll ``path`` until ``done(state)``; ApiError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            state: dict[str, Any] = self.get(path)
            if on_poll is not None:
                on_poll(state)
            if done(state):
                return state
            if time.monotonic() > deadline:
                raise ApiError(f"timed out after {timeout:.0f} s waiting for {what} ({self.url}{path})")
            time.sleep(interval)


# ------------------------------------------------------------------ what the CLI and the demo do with it


def import_msd_folder(
    preprocessing: ServiceClient,
    folder: str | os.PathLike[str],
    collection: str | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    threads: int = 4,
) -> dict[str, Any]:
    """Upload every labelled pair of an MSD folder as cases of ``collection`` (default: its name).

    Idempotent: the source of each case is its path in the folder, so sending the folder again changes
    nothing. A case the service refuses (unreadable, label off the grid) is reported, the others go in.
    Returns ``{"collection", "counts": {added, updated, unchanged}, "errors": {case: reason}}``.
    """
    index = read_msd_index(Path(folder))
    name = collection or index.name
    labels = json.dumps({str(k): v for k, v in index.labels.items()})
    counts = {"added": 0, "updated": 0, "unchanged": 0}
    errors: dict[str, str] = {}

    def send(pair: tuple[Path, Path | None]) -> tuple[str, str | None, str | None]:
        image, label = pair
        case_id = case_id_of(image)
        files = {"image": (image.name, image.read_bytes())}
        if label is not None:
            files["label"] = (label.name, label.read_bytes())
        form = {
            "modality": index.modality,
            "label_names": labels,
            "source": f"msd:{index.root.name}/{image.relative_to(index.root).as_posix()}",
        }
        try:
            body = preprocessing.put(
                f"/collections/{name}/cases/{case_id}", files=files, data=form, expected=(200, 201)
            )
        except ApiError as exc:
            if exc.status in (409, 413, 422):
                return case_id, None, str(exc)
            raise
        return case_id, body["state"], None

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for done, (case_id, state, error) in enumerate(pool.map(send, index.pairs), start=1):
            if error is not None:
                errors[case_id] = error
            else:
                counts[str(state)] += 1
            if progress is not None:
                progress(done, len(index.pairs), case_id)
    return {"collection": name, "counts": counts, "errors": errors}


def build_dataset(
    preprocessing: ServiceClient,
    request: dict[str, Any],
    timeout: float = 900,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``POST /datasets`` and wait for the build; the new version (``GET /datasets/{id}``)."""
    build = preprocessing.post("/datasets", json=request, expected=(202,))
    state = preprocessing.wait(
        f"/datasets/builds/{build['id']}", lambda b: b["status"] in ("done", "failed"), timeout, "the dataset build"
    )
    if state["status"] != "done":
        raise ApiError(f"dataset build {build['id']} failed: {state.get('error')}")
    version: dict[str, Any] = preprocessing.get(f"/datasets/{state['version_id']}")
    return version


def export_model(inference: ServiceClient, request: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """``POST /v1/model-exports`` and wait; the finished export, or ApiError with the gate's reason."""
    job = inference.post("/v1/model-exports", json=request, expected=(202,))
    state = inference.wait(
        f"/v1/model-exports/{job['id']}", lambda e: e["status"] in ("succeeded", "failed"), timeout, "the export"
    )
    if state["status"] != "succeeded":
        raise ApiError(f"export of {request['model_uri']} failed: {state.get('error')}")
    return state
