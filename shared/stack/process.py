"""The generic half of the local stack: one :class:`Component` = one long-running process.

Kept free of PostgreSQL/Orthanc/… specifics so that voxelflow's own services can be appended to the
stack as plain entries (name, argv, env, port, health URL) without touching the manager.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


class StackError(RuntimeError):
    """A component could not be started, reached or stopped; the message says where to look."""


@dataclass
class Component:
    """One process of the stack, or one external server standing in for it.

    ``health`` must be cheap and quick (a second or two at most): it is polled during start-up and called
    by ``status``. Hooks are idempotent, because ``up`` runs ``after_ready`` also when it finds the
    component already running (a bucket or database may have been dropped since).
    """

    name: str
    argv: Sequence[str]
    url: str
    health: Callable[[], bool]
    ports: Sequence[int] = ()
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    requires: Sequence[str] = ()
    prepare: Callable[[], None] | None = None
    after_ready: Callable[[], None] | None = None
    user: str | None = None
    stop_signal: int = signal.SIGTERM
    ready_timeout: float = 60.0
    external: bool = False
    optional_group: str | None = None  # e.g. "services": started only when that group is asked for
    #: variables of the caller's environment the process must not inherit (they would change its behaviour)
    unset_env: Sequence[str] = ()
    #: why this machine cannot start the component (a binary that is not installed, and how to install it);
    #: ``up`` refuses to start it with this message, other commands (``status``, ``down``) still work
    missing: str | None = None


def http_ok(url: str, timeout: float = 2.0) -> Callable[[], bool]:
    """A health probe that is true when ``url`` answers a GET with a 2xx status."""

    def probe() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return 200 <= int(response.status) < 300
        except (urllib.error.URLError, OSError, ValueError):
            return False

    return probe


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when a socket is bound to ``host:port``.

    SO_REUSEADDR, like the servers themselves use, so connections lingering in TIME_WAIT after a server
    stopped do not count as "in use".
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _proc_start_time(pid: int) -> str | None:
    """Kernel start time of ``pid`` (``/proc/PID/stat`` field 22), or None if it is gone or a zombie.

    Stored in pidfiles next to the pid, so that a reused pid after a reboot is never signalled.
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


class ProcessTable:
    """Pidfiles and log files of the processes this stack started, under ``<state>/run`` and ``/logs``."""

    def __init__(self, state_dir: Path) -> None:
        self.run_dir = state_dir / "run"
        self.log_dir = state_dir / "logs"
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    def pidfile(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def logfile(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def running_pid(self, name: str) -> int | None:
        """The pid recorded for ``name`` if that very process still runs; stale pidfiles are removed."""
        child = self._children.get(name)
        if child is not None:
            child.poll()  # reap our own exited children so they do not linger as zombies
        path = self.pidfile(name)
        try:
            pid_text, start_time = path.read_text().split()
            pid = int(pid_text)
        except (FileNotFoundError, ValueError):
            return None
        if _proc_start_time(pid) != start_time:
            path.unlink(missing_ok=True)
            return None
        return pid

    def spawn(self, component: Component, extra_env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start the process in its own session (its own process group, which ``stop`` signals)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **extra_env, **component.env}
        for name in component.unset_env:
            env.pop(name, None)
        with open(self.logfile(component.name), "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(component.argv)}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(
                    list(component.argv),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=component.cwd,
                    env=env,
                    start_new_session=True,
                    user=component.user,
                    group=component.user,
                    extra_groups=[] if component.user else None,
                )
            except OSError as exc:
                raise StackError(f"{component.name}: cannot run {component.argv[0]!r}: {exc}") from exc
        start_time = _proc_start_time(proc.pid) or "0"
        self.pidfile(component.name).write_text(f"{proc.pid} {start_time}\n")
        self._children[component.name] = proc
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> bool:
        """Signal the process group, wait, then SIGKILL it. Returns False when nothing was running."""
        pid = self.running_pid(name)
        if pid is None:
            self.pidfile(name).unlink(missing_ok=True)
            return False
        self._signal_group(pid, sig)
        if not self._wait_gone(name, pid, timeout):
            self._signal_group(pid, signal.SIGKILL)
            self._wait_gone(name, pid, 5.0)
        self.pidfile(name).unlink(missing_ok=True)
        self._children.pop(name, None)
        return True

    @staticmethod
    def _signal_group(pid: int, sig: int) -> None:
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _wait_gone(self, name: str, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        child = self._children.get(name)
        while time.monotonic() < deadline:
            if child is not None:
                child.poll()
            if _proc_start_time(pid) is None:
                return True
            time.sleep(0.1)
        return False

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            text = self.logfile(name).read_text(errors="replace")
        except FileNotFoundError:
            return "(no log yet)"
        return "\n".join(text.rstrip().splitlines()[-lines:])
