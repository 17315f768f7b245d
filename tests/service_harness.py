"""What every service's test fixtures need: the bundled real data, a free port, environment variables set
for a scope and restored after it, a real uvicorn server in a thread, and one API token per role.

The services' APIs are served over real HTTP (not ASGI in-process) so that the tests go through the same
middleware, body limits and connection handling as production.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from shared.data import shared_data_dir


def require_shared_data() -> Path:
    """``../shared/data`` (read in place): a skip where it is not mounted, a failure in CI, where missing
    data is a broken setup and not a reason to skip."""
    found = shared_data_dir()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("shared data not found: set VOXELFLOW_SHARED_DATA or provide <repo>/../shared/data")
        pytest.skip("shared real-data folder not found: set VOXELFLOW_SHARED_DATA or provide <repo>/../shared/data")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def patched_environ(env: Mapping[str, str]) -> Iterator[dict[str, str]]:
    """Set ``env`` in ``os.environ`` for the block and restore what was there (or its absence) after."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield dict(env)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def serving(app: Any, what: str, port: int | None = None, stop_timeout: float = 15) -> Iterator[str]:
    """Serve the ASGI ``app`` with uvicorn in a daemon thread; yields its base URL once it accepts."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True, name=f"uvicorn-{what}")
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail(f"{what} API did not start on port {port}")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=stop_timeout)


def tokens_for_every_role(session_factory: Any, prefix: str) -> dict[str, str]:
    """A fresh API token per role (names are unique per call), keyed by the role's value."""
    from shared.auth import Role, create_token
    from shared.db.base import session_scope

    suffix = time.time_ns()
    with session_scope(session_factory) as session:
        return {role.value: create_token(session, f"{prefix}-{role.value}-{suffix}", role) for role in Role}


def wait_for(
    predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.2, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned), or fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")
