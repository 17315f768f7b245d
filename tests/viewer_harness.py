"""A real web viewer for the tests: the prebuilt OHIF v3 app served next to a DICOMweb proxy, opened in headless
Chromium driven over the DevTools protocol.

- :func:`serving_ohif` serves ``.tools/ohif/<version>/dist`` (``make install`` puts it there through
  ``ci/install-ohif.sh``) from one local HTTP server that also forwards ``/dicom-web/...`` to the test Orthanc,
  so the viewer and its DICOMweb server share one origin (no CORS configuration anywhere). ``/app-config.js``
  is generated: one DICOMweb data source at that origin, hydration prompts off.
- :class:`HeadlessChromium` starts Debian's ``chromium`` with ``--remote-debugging-pipe`` and speaks the
  DevTools protocol (JSON messages separated by NUL bytes on file descriptors 3 and 4) itself: no browser
  automation package and no browser download. Waiting is on page conditions (JavaScript polled with a bounded
  timeout), never on fixed sleeps.
"""

from __future__ import annotations

import base64
import fcntl
import functools
import http.server
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.service_harness import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
OHIF_VERSION = "3.13.2"  # ci/install-ohif.sh pins the same version and its tarball's integrity
CHROMIUM = "chromium"

_CONTENT_TYPES = {
    ".js": "text/javascript",
    ".wasm": "application/wasm",
    ".css": "text/css",
    ".json": "application/json",
}
# hop-by-hop headers and the ones httpx already decoded for us must not be forwarded as they came
_NOT_FORWARDED = {"connection", "keep-alive", "transfer-encoding", "content-encoding", "content-length"}


def ohif_dist() -> Path:
    """The installed viewer; a failure in CI (``make install`` must have put it there), a skip elsewhere."""
    root = Path(os.environ.get("VOXELFLOW_OHIF_DIR", REPO_ROOT / ".tools" / "ohif"))
    dist = root / OHIF_VERSION / "dist"
    if not (dist / "index.html").is_file():
        message = f"OHIF {OHIF_VERSION} not installed in {dist}: run ci/install-ohif.sh (part of make install)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return dist


def chromium_path() -> str:
    """Debian's chromium (ci/install-system.sh installs it); the same failure-in-CI rule as :func:`ohif_dist`."""
    found = shutil.which(CHROMIUM)
    if found is None:
        message = "chromium not installed: run ci/install-system.sh (part of make install)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def app_config(origin: str) -> str:
    """OHIF's ``window.config``: one DICOMweb source (the proxy at ``origin``), no confirmation prompts, so a SEG
    shown in a viewport is hydrated (turned into a segmentation overlay on its referenced series) at once."""
    root = f"{origin}/dicom-web"
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "orthanc",
        "configuration": {
            "friendlyName": "test Orthanc",
            "name": "orthanc",
            "wadoUriRoot": f"{origin}/wado",
            "qidoRoot": root,
            "wadoRoot": root,
            "qidoSupportsIncludeField": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "disableConfirmationPrompts": True,
        "investigationalUseDialog": {"option": "never"},
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 10},
        "defaultDataSourceName": "orthanc",
        "dataSources": [source],
    }
    return f"window.config = {json.dumps(config, indent=2)};\n"


class _ViewerHandler(http.server.SimpleHTTPRequestHandler):
    """Static files of the OHIF dist (the single-page app's routes fall back to index.html) and a forwarding
    proxy for ``/dicom-web`` and ``/wado`` to Orthanc."""

    server: _ViewerServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def guess_type(self, path: str | os.PathLike[str]) -> str:
        return _CONTENT_TYPES.get(Path(path).suffix, super().guess_type(path))

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path.startswith(("/dicom-web/", "/wado")):
            self._forward()
        elif path == "/app-config.js":
            self._send(200, "text/javascript", self.server.app_config.encode())
        elif path != "/" and (Path(self.directory) / path.lstrip("/")).is_file():
            super().do_GET()
        else:  # a route of the app (/viewer, /segmentation, ...): the app itself
            self._send(200, "text/html", (Path(self.directory) / "index.html").read_bytes())

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _forward(self) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() in {"accept", "range"}}
        upstream = self.server.upstream.get(self.path, headers=headers)
        self.send_response(upstream.status_code)
        for key, value in upstream.headers.items():
            if key.lower() not in _NOT_FORWARDED:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(upstream.content)))
        self.end_headers()
        self.wfile.write(upstream.content)


class _ViewerServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, dist: Path, orthanc_url: str) -> None:
        self.app_config = app_config(f"http://127.0.0.1:{port}")
        self.upstream = httpx.Client(base_url=orthanc_url, timeout=60)
        super().__init__(("127.0.0.1", port), functools.partial(_ViewerHandler, directory=str(dist)))


@contextmanager
def serving_ohif(orthanc_url: str) -> Iterator[str]:
    """OHIF and a proxy to ``orthanc_url`` on one local origin, served from a thread; yields the origin."""
    port = free_port()
    server = _ViewerServer(port, ohif_dist(), orthanc_url)
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="ohif-viewer")
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()
        server.upstream.close()
        thread.join(timeout=10)


class BrowserError(RuntimeError):
    """A DevTools command failed, or the page threw while evaluating an expression."""


class HeadlessChromium:
    """One headless Chromium with one page, over ``--remote-debugging-pipe``.

    Console messages and uncaught exceptions of the page are kept in :attr:`console` so that a failing wait
    can say what the viewer itself reported."""

    def __init__(self, width: int = 1280, height: int = 800) -> None:
        self.console: list[str] = []
        self._next_id = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self._arrived = threading.Condition()
        self._profile = tempfile.mkdtemp(prefix="voxelflow-chromium-")
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        args = [
            chromium_path(),
            "--headless=new",
            "--remote-debugging-pipe",
            f"--user-data-dir={self._profile}",
            f"--window-size={width},{height}",
            "--no-sandbox",  # the tests run as root in CI, where Chromium's sandbox refuses to start
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-dev-shm-usage",
            # WebGL (cornerstone3D renders with it) on the CPU: no GPU on these machines
            "--use-angle=swiftshader",
            "--enable-unsafe-swiftshader",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            "about:blank",
        ]

        # The browser reads commands on its fd 3 and writes replies on its fd 4. The pipe ends are first moved to
        # numbers of 10 and up (so neither is 3 or 4 itself), then put on 3 and 4 in the child right before exec;
        # every other descriptor of this process is non-inheritable (PEP 446), so close_fds=False leaks nothing.
        r, w = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_browser_r, from_browser_w))
        os.close(to_browser_r)
        os.close(from_browser_w)

        def pipes_on_3_and_4() -> None:
            os.dup2(r, 3)
            os.dup2(w, 4)

        self._process = subprocess.Popen(
            args,
            preexec_fn=pipes_on_3_and_4,  # two dup2 calls: nothing that could deadlock
            close_fds=False,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(r)
        os.close(w)
        self._writer = os.fdopen(to_browser_w, "wb", buffering=0)
        self._reader = threading.Thread(target=self._read, args=(from_browser_r,), daemon=True, name="cdp-reader")
        self._reader.start()
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime"):
            self.send(f"{domain}.enable", session=True)
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session=True,
        )

    def _read(self, fd: int) -> None:
        buffer = b""
        with os.fdopen(fd, "rb", buffering=0) as pipe:
            while chunk := pipe.read(1 << 16):
                buffer += chunk
                *messages, buffer = buffer.split(b"\0")
                for raw in messages:
                    self._dispatch(json.loads(raw))
        with self._arrived:
            self._arrived.notify_all()

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "id" in message:
            with self._arrived:
                self._replies[message["id"]] = message
                self._arrived.notify_all()
        elif message.get("method") == "Runtime.consoleAPICalled":
            params = message["params"]
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.console.append(f"console.{params.get('type')}: {text}"[:500])
        elif message.get("method") == "Runtime.exceptionThrown":
            details = message["params"]["exceptionDetails"]
            self.console.append(
                f"exception: {details.get('exception', {}).get('description', details.get('text'))}"[:500]
            )

    def send(
        self, method: str, params: dict[str, Any] | None = None, session: bool = False, timeout: float = 60
    ) -> Any:
        """One DevTools command; its ``result`` (a :class:`BrowserError` for an error reply)."""
        with self._arrived:
            self._next_id += 1
            call_id = self._next_id
        message: dict[str, Any] = {"id": call_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self._session
        self._writer.write(json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._arrived:
            while call_id not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or not self._reader.is_alive():
                    raise BrowserError(f"no reply to {method} within {timeout}s")
                self._arrived.wait(left)
            reply = self._replies.pop(call_id)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", {"url": url}, session=True)

    def evaluate(self, expression: str, timeout: float = 60) -> Any:
        """The JSON value of ``expression`` in the page (promises awaited)."""
        params = {"expression": expression, "returnByValue": True, "awaitPromise": True}
        result = self.send("Runtime.evaluate", params, session=True, timeout=timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(details.get("exception", {}).get("description", details.get("text")))
        return result["result"].get("value")

    def wait_until(self, expression: str, timeout: float, what: str) -> Any:
        """Evaluate ``expression`` until it is truthy (returned) or fail after ``timeout`` seconds, naming ``what``
        and the last console lines of the page. Exceptions while the app boots count as "not yet"."""
        deadline = time.monotonic() + timeout
        last_error = ""
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression, timeout=max(deadline - time.monotonic(), 1))
            except BrowserError as error:
                value, last_error = None, str(error)
            if value:
                return value
            time.sleep(0.2)
        tail = "\n".join(self.console[-15:])
        pytest.fail(f"timed out after {timeout}s waiting for {what}; last error: {last_error}\npage console:\n{tail}")

    def screenshot(self, clip: dict[str, float] | None = None) -> bytes:
        """PNG bytes of the page, or of ``clip`` ({x, y, width, height} in CSS pixels)."""
        params: dict[str, Any] = {"format": "png"}
        if clip:
            params["clip"] = {**clip, "scale": 1}
        return base64.b64decode(self.send("Page.captureScreenshot", params, session=True)["data"])

    def close(self) -> None:
        with suppress(BrowserError):
            self.send("Browser.close", timeout=10)
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)
        self._writer.close()
        shutil.rmtree(self._profile, ignore_errors=True)


@contextmanager
def headless_chromium(width: int = 1280, height: int = 800) -> Iterator[HeadlessChromium]:
    browser = HeadlessChromium(width, height)
    try:
        yield browser
    finally:
        browser.close()
