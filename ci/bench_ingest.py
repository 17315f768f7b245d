#!/usr/bin/env python3
"""STOW-RS throughput: voxelflow's ingest API next to Orthanc's own STOW-RS, same machine, same files.

``make bench-ingest`` (or ``python ci/bench_ingest.py --clients 1,4,16 --batch 10 --repeat 1``):

1. starts a private stack (PostgreSQL with fsync on, Redis, SeaweedFS S3, Orthanc) through :mod:`shared.stack`
   on a free port range in a temp state dir, the ingest API as a separate ``uvicorn`` process with
   ``--workers`` worker processes (default: the CPU count, at least 2; migrations run once before), and,
   when Debian ``orthanc-postgresql`` is installed, a second Orthanc configured like the first but with its
   index in PostgreSQL (the plugin, on the stack's PostgreSQL server, its own database);
2. loads the DICOM files of ``tcia_brain_tumor_progression_mr`` and, for every timed run, rewrites their
   Study/Series/SOP Instance UIDs in memory (fresh UIDs, so no server can answer from what it already
   holds) and pre-encodes the multipart bodies before the timer starts;
3. sends them with N concurrent clients (threads, one HTTP connection each) to
   ``POST {ingest}/dicomweb/studies`` and ``POST {orthanc}/dicom-web/studies``; voxelflow additionally gets
   the bodies of its last run again ("voxelflow (duplicates)": idempotent re-sends);
4. prints a table (inst/s, MB/s, ratio voxelflow/Orthanc at the same client count for both Orthanc
   configurations, and the CPU time all server processes spent per instance, read from /proc: on a machine
   whose cores other jobs share, that says what an instance costs where the wall-clock rate cannot) and
   writes it to ``out/bench-ingest.json`` (with the CPU split by process); stops everything it started,
   also on failure and Ctrl-C.

MB are 10^6 bytes of DICOM payload (the files, without multipart framing).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402
import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from shared.data import shared_data_dir  # noqa: E402

DATASET = "tcia_brain_tumor_progression_mr"
BOUNDARY = "vfbenchboundary"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
INFRA_NEEDED = ("postgres", "redis", "s3", "orthanc")
ORTHANC = "orthanc"
ORTHANC_PG = "orthanc (PostgreSQL index)"
PG_INDEX_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so")  # Debian orthanc-postgresql
MIGRATE = (
    "from services.ingest.context import IngestContext\n"
    "from services.ingest.settings import IngestSettings\n"
    "IngestContext(IngestSettings()).migrate()\n"
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ data


def bench_data_dir() -> Path:
    root = shared_data_dir()
    if root is None or not (root / DATASET).is_dir():
        raise SystemExit(f"shared data with {DATASET}/ not found: set VOXELFLOW_SHARED_DATA")
    return root


def load_datasets(root: Path, limit: int | None) -> list[pydicom.Dataset]:
    files = sorted((root / DATASET).rglob("*.dcm"))
    if limit:
        files = files[:limit]
    if not files:
        raise SystemExit(f"no .dcm files under {root / DATASET}")
    return [pydicom.dcmread(path) for path in files]


def with_fresh_uids(datasets: list[pydicom.Dataset]) -> list[bytes]:
    """Encoded copies with new Study/Series/SOP Instance UIDs (series structure kept, one map per call)."""
    mapping: dict[str, str] = {}

    def fresh(uid: str) -> str:
        if uid not in mapping:
            mapping[uid] = generate_uid()
        return mapping[uid]

    out = []
    for ds in datasets:
        originals = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        ds.StudyInstanceUID = fresh(originals[0])
        ds.SeriesInstanceUID = fresh(originals[1])
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = originals
        ds.file_meta.MediaStorageSOPInstanceUID = originals[2]
    return out


@dataclass
class Workload:
    bodies: list[tuple[bytes, int, int]]  # (multipart body, instances, DICOM payload bytes)

    @property
    def instances(self) -> int:
        return sum(n for _, n, _ in self.bodies)

    @property
    def payload_bytes(self) -> int:
        return sum(b for _, _, b in self.bodies)


def make_workload(files: list[bytes], batch: int) -> Workload:
    bodies = []
    for start in range(0, len(files), batch):
        chunk = files[start : start + batch]
        body = b"".join(
            f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n" for data in chunk
        )
        body += f"--{BOUNDARY}--\r\n".encode()
        bodies.append((body, len(chunk), sum(len(d) for d in chunk)))
    return Workload(bodies)


# ------------------------------------------------------------------------------------------------ runs


@dataclass
class Target:
    name: str
    url: str  # STOW-RS endpoint
    headers: dict[str, str]


@dataclass
class Row:
    server: str
    clients: int
    repeat: int
    instances: int
    mb: float
    seconds: float
    inst_per_s: float
    mb_per_s: float
    stored: int
    failed: int
    http_errors: int
    ratio: float | None = None  # inst/s over Orthanc's (default SQLite index), same client count
    ratio_pg: float | None = None  # inst/s over Orthanc's with the PostgreSQL index plugin
    #: CPU time of the servers' processes (APIs, PostgreSQL, S3, Redis, Orthanc) per instance: how much work
    #: an instance costs, which the wall-clock rate hides on a machine whose cores other jobs share
    server_cpu_ms: float | None = None
    cpu_by_process: dict[str, float] | None = None  # CPU seconds of the run, by process (tree)


def _count(response: httpx.Response) -> tuple[int, int]:
    """(referenced, failed) instances of a STOW-RS response (DICOM JSON)."""
    try:
        body = response.json()
    except ValueError:
        return 0, 0
    if isinstance(body, list):  # Orthanc answers a one-element array in some versions
        body = body[0] if body else {}
    ref = len((body.get("00081199") or {}).get("Value") or [])
    bad = len((body.get("00081198") or {}).get("Value") or [])
    return ref, bad


def run_load(target: Target, work: Workload, clients: int, label: str) -> tuple[float, int, int, int]:
    """Send every body once with ``clients`` threads; return (seconds, stored, failed, http_errors)."""
    pending: queue.Queue[tuple[bytes, int, int]] = queue.Queue()
    for item in work.bodies:
        pending.put(item)
    lock = threading.Lock()
    totals = {"stored": 0, "failed": 0, "errors": 0, "done": 0}
    errors: list[str] = []
    total = work.instances
    tty = sys.stderr.isatty()
    http = [httpx.Client(headers=target.headers, timeout=600) for _ in range(clients)]

    def worker(client: httpx.Client) -> None:
        while True:
            try:
                body, n, _ = pending.get_nowait()
            except queue.Empty:
                return
            try:
                response = client.post(target.url, content=body, headers={"Content-Type": CONTENT_TYPE})
                ref, bad = _count(response)
                ok = response.status_code in (200, 202)
                detail = "" if ok else f"HTTP {response.status_code}: {response.text[:300]}"
            except httpx.HTTPError as exc:
                ref, bad, ok, detail = 0, n, False, f"{type(exc).__name__}: {exc}"
            with lock:
                totals["stored"] += ref
                totals["failed"] += bad
                totals["done"] += n
                if not ok:
                    totals["errors"] += 1
                    errors.append(detail)
                done = totals["done"]
            if tty:
                print(f"\r  {label}: {done}/{total} instances", end="", file=sys.stderr, flush=True)

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in http]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    if tty:
        print(file=sys.stderr, flush=True)
    for client in http:
        client.close()
    for detail in errors[:3]:
        log(f"  ! {label}: {detail}")
    return seconds, totals["stored"], totals["failed"], totals["errors"]


def _proc_stats() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds of the process and its reaped children), from /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        # after "pid (comm)": state ppid ... utime(11) stime(12) cutime(13) cstime(14)
        out[int(entry)] = (int(fields[1]), sum(int(v) for v in fields[11:15]) / tick)
    return out


def cpu_seconds(roots: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each named process tree (root pid and every descendant)."""
    if not Path("/proc/self/stat").exists():
        return {}
    stats = _proc_stats()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    totals: dict[str, float] = {}
    for name, root in roots.items():
        total, todo = 0.0, [root]
        while todo:
            pid = todo.pop()
            if pid in stats:
                total += stats[pid][1]
                todo.extend(children.get(pid, ()))
        totals[name] = total
    return totals


def measure(
    target: Target, name: str, work: Workload, clients: int, rep: int, processes: Callable[[], dict[str, int]]
) -> Row:
    label = f"{name:<24} clients={clients} rep={rep}"
    roots = processes()
    before = cpu_seconds(roots)
    seconds, stored, failed, errors = run_load(target, work, clients, label)
    after = cpu_seconds(roots)
    used = {k: round(after[k] - before.get(k, 0.0), 3) for k in after}
    mb = work.payload_bytes / 1e6
    row = Row(
        server=name,
        clients=clients,
        repeat=rep,
        instances=work.instances,
        mb=round(mb, 2),
        seconds=round(seconds, 3),
        inst_per_s=round(work.instances / seconds, 2),
        mb_per_s=round(mb / seconds, 2),
        stored=stored,
        failed=failed,
        http_errors=errors,
        server_cpu_ms=round(sum(used.values()) * 1000 / work.instances, 2) if used else None,
        cpu_by_process=used or None,
    )
    cpu = f", server CPU {row.server_cpu_ms:.1f} ms/inst" if row.server_cpu_ms is not None else ""
    log(f"  {label}: {row.inst_per_s:.1f} inst/s, {row.mb_per_s:.1f} MB/s ({seconds:.2f} s, {failed} failed{cpu})")
    return row


# ------------------------------------------------------------------------------------------------ servers


def free_base_port() -> int:
    import random

    from shared.stack import PortOffsets
    from shared.stack.process import port_in_use

    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(20000, 32000 - PortOffsets.SPAN, 10)
        if not any(port_in_use(base + offset) for offset in range(PortOffsets.SPAN)):
            return base
    raise RuntimeError("no free port range found between 20000 and 32000")


def wait_ready(url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


class Servers:
    """The private stack plus the ingest API process; a context manager that always tears down."""

    def __init__(
        self, state_dir: Path, fsync: bool, profile: Path | None, workers: int = 1, orthanc_pg: bool = False
    ) -> None:
        from shared.stack import Stack, StackConfig

        self.state_dir = state_dir
        config = StackConfig(state_dir=state_dir / "stack", base_port=free_base_port(), ephemeral=not fsync)
        self.stack = Stack(config, log=lambda m: log(f"  {m}"))
        self.ingest_port = self.stack.components["ingest-api"].ports[0]
        self.ingest_url = f"http://127.0.0.1:{self.ingest_port}"
        self.profile = profile
        self.workers = 1 if profile is not None else workers
        self.orthanc_pg = orthanc_pg
        self.orthanc_pg_url = ""
        self.orthanc_pg_proc: subprocess.Popen[bytes] | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.token = ""

    def __enter__(self) -> Servers:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        log(f"starting private stack in {self.stack.state_dir} (base port {self.stack.config.base_port})")
        self.stack.up(only=INFRA_NEEDED)
        env = dict(os.environ)
        env.update(self.stack.env_vars(INFRA_NEEDED))
        env.update(
            {
                "VOXELFLOW_DEID_KEY": "bench-key-" + "0" * 32,
                "VOXELFLOW_PROJECT": "bench",
                "VOXELFLOW_SITE": "bench-site",
                "VOXELFLOW_LOG_JSON": "false",
                "VOXELFLOW_LOG_LEVEL": "WARNING",
                "VOXELFLOW_SERIES_STABLE_SECONDS": "3600",
                "VOXELFLOW_PUBLIC_URL": self.ingest_url,
                "VOXELFLOW_PACS": json.dumps({"orthanc": {"url": f"{self.stack.orthanc_url}/dicom-web"}}),
                "PYTHONUNBUFFERED": "1",
            }
        )
        # Migrations once, before the workers start (each worker's startup migration is then a no-op):
        # several processes creating the same tables at once would race.
        subprocess.run([sys.executable, "-c", MIGRATE], cwd=REPO_ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        uvicorn_args = [
            "services.ingest.main:app",
            "--workers",
            str(self.workers),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.ingest_port),
            "--log-level",
            "warning",
            "--no-access-log",
        ]
        if self.profile is not None:
            # yappi sees the worker threads STOW runs in (cProfile would only see the event loop)
            me = str(Path(__file__).resolve())
            argv = [sys.executable, me, "--_profiled-server", str(self.profile), *uvicorn_args]
        else:
            argv = [sys.executable, "-m", "uvicorn", *uvicorn_args]
        log_path = self.state_dir / "ingest.log"
        log(f"starting ingest API on {self.ingest_url}, {self.workers} worker process(es) (log: {log_path})")
        with log_path.open("wb") as log_file:
            self.proc = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_ready(f"{self.ingest_url}/readyz", self.proc, log_path)
        self.token = self._create_token()
        log("ingest API ready (migrations applied, pacs token created)")
        if self.orthanc_pg:
            self._start_orthanc_pg()

    def _start_orthanc_pg(self) -> None:
        """A second Orthanc, configured as the stack's but with its index in PostgreSQL (the Debian plugin),
        on the stack's PostgreSQL server (its own database), so both PACS set-ups face voxelflow's."""
        import shutil
        import socket

        from sqlalchemy import create_engine, text

        from shared.stack import PortOffsets

        engine = create_engine(self.stack.database_url("postgres"), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                connection.execute(text("CREATE DATABASE orthanc_index"))
        finally:
            engine.dispose()
        base = self.state_dir / "orthanc-pg"
        (base / "db").mkdir(parents=True)
        config = json.loads((self.stack.state_dir / "orthanc" / "orthanc.json").read_text())
        ports = []
        for _ in range(2):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                ports.append(probe.getsockname()[1])
        config.update(
            {
                "Name": "voxelflow-pacs-pg",
                "StorageDirectory": str(base / "db"),
                "IndexDirectory": str(base / "db"),
                "HttpPort": ports[0],
                "DicomPort": ports[1],
                "DicomModalities": {},
                "Plugins": [*config["Plugins"], str(PG_INDEX_PLUGIN)],
                "PostgreSQL": {
                    "EnableIndex": True,
                    "EnableStorage": False,  # files on disk, as the default Orthanc's
                    "Host": "127.0.0.1",
                    "Port": self.stack.config.port(PortOffsets.POSTGRES),
                    "Database": "orthanc_index",
                    "Username": "postgres",
                    "Password": "",
                    "Lock": False,
                },
            }
        )
        (base / "orthanc.json").write_text(json.dumps(config, indent=2))
        self.orthanc_pg_url = f"http://127.0.0.1:{ports[0]}"
        log_path = base / "orthanc.log"
        log(f"starting Orthanc with the PostgreSQL index on {self.orthanc_pg_url} (log: {log_path})")
        with log_path.open("wb") as log_file:
            self.orthanc_pg_proc = subprocess.Popen(
                [shutil.which("Orthanc") or "/usr/sbin/Orthanc", str(base / "orthanc.json")],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_ready(f"{self.orthanc_pg_url}/system", self.orthanc_pg_proc, log_path, timeout=60)

    def process_roots(self) -> dict[str, int]:
        """Root pid of each server process tree (for the CPU accounting)."""
        roots = {name: self.stack.procs.running_pid(name) for name in INFRA_NEEDED}
        roots["ingest-api"] = self.proc.pid if self.proc is not None else None
        roots["orthanc-pg"] = self.orthanc_pg_proc.pid if self.orthanc_pg_proc is not None else None
        return {name: pid for name, pid in roots.items() if pid is not None}

    def _create_token(self) -> str:
        from shared.auth import Role, create_token
        from shared.db.base import make_engine, make_session_factory, session_scope

        engine = make_engine(self.stack.database_url(self.stack.config.app_database))
        try:
            with session_scope(make_session_factory(engine)) as session:
                return create_token(session, f"bench-{os.getpid()}-{time.time_ns()}", Role.PACS)
        finally:
            engine.dispose()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if self.profile is not None:
                self.proc.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully; the profile is written
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=30)
            stop_process(self.proc)
            log("stopped ingest API")
        if self.orthanc_pg_proc is not None:
            stop_process(self.orthanc_pg_proc)
            log("stopped Orthanc (PostgreSQL index)")
        self.stack.down(purge=True)


def profiled_server(profile_path: str, uvicorn_args: list[str]) -> None:
    """``--_profiled-server``: uvicorn in this process under yappi (all threads), stats written at exit."""
    import yappi
    from uvicorn.main import main as uvicorn_main

    yappi.set_clock_type("wall")
    yappi.start()
    try:
        uvicorn_main(uvicorn_args, standalone_mode=False)
    finally:
        yappi.stop()
        stats = yappi.get_func_stats()
        stats.save(profile_path, type="pstat")


# ------------------------------------------------------------------------------------------------ report


def table(rows: list[Row]) -> str:
    width = max(24, *(len(r.server) for r in rows))
    header = (
        f"{'server':<{width}} {'clients':>7} {'instances':>9} {'MB':>8} {'seconds':>8} "
        f"{'inst/s':>8} {'MB/s':>7} {'ratio':>6} {'ratio PG':>8} {'CPU ms/inst':>11}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else ""
        ratio_pg = f"{r.ratio_pg:.2f}" if r.ratio_pg is not None else ""
        cpu = f"{r.server_cpu_ms:.1f}" if r.server_cpu_ms is not None else ""
        note = f"  ({r.failed} failed, {r.http_errors} HTTP errors)" if r.failed or r.http_errors else ""
        lines.append(
            f"{r.server:<{width}} {r.clients:>7} {r.instances:>9} {r.mb:>8.1f} {r.seconds:>8.2f} "
            f"{r.inst_per_s:>8.1f} {r.mb_per_s:>7.1f} {ratio:>6} {ratio_pg:>8} {cpu:>11}{note}"
        )
    return "\n".join(lines)


def summarise(rows: list[Row]) -> list[Row]:
    """One row per (server, clients), summed over repetitions; ratio = inst/s over Orthanc's (default index),
    ratio PG = over Orthanc's with the PostgreSQL index, same clients; CPU = server CPU ms per instance."""
    merged: dict[tuple[str, int], Row] = {}
    cpu_seconds: dict[tuple[str, int], float] = {}
    for r in rows:
        key = (r.server, r.clients)
        if key not in merged:
            merged[key] = Row(r.server, r.clients, 0, 0, 0.0, 0.0, 0.0, 0.0, 0, 0, 0)
        m = merged[key]
        m.repeat += 1
        m.instances += r.instances
        m.mb = round(m.mb + r.mb, 2)
        m.seconds = round(m.seconds + r.seconds, 3)
        m.stored += r.stored
        m.failed += r.failed
        m.http_errors += r.http_errors
        if r.server_cpu_ms is not None:
            cpu_seconds[key] = cpu_seconds.get(key, 0.0) + r.server_cpu_ms * r.instances / 1000
    for key, m in merged.items():
        m.inst_per_s = round(m.instances / m.seconds, 2)
        m.mb_per_s = round(m.mb / m.seconds, 2)
        if key in cpu_seconds:
            m.server_cpu_ms = round(cpu_seconds[key] * 1000 / m.instances, 2)
    for (server, clients), m in merged.items():
        orthanc, orthanc_pg = merged.get((ORTHANC, clients)), merged.get((ORTHANC_PG, clients))
        if server != ORTHANC and orthanc is not None:
            m.ratio = round(m.inst_per_s / orthanc.inst_per_s, 3)
        if server not in (ORTHANC, ORTHANC_PG) and orthanc_pg is not None:
            m.ratio_pg = round(m.inst_per_s / orthanc_pg.inst_per_s, 3)
    order = {"voxelflow": 0, "voxelflow (duplicates)": 1, ORTHANC: 2, ORTHANC_PG: 3}
    return sorted(merged.values(), key=lambda r: (r.clients, order.get(r.server, 9)))


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,4,16", help="concurrent clients, comma-separated")
    parser.add_argument(
        "--workers",
        type=int,
        default=max(2, os.cpu_count() or 1),
        help="uvicorn worker processes of the ingest API (default: the CPU count, at least 2)",
    )
    parser.add_argument("--batch", type=int, default=10, help="instances per STOW-RS request (default 10)")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per (server, clients) (default 1)")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N files (default: all 283)")
    parser.add_argument("--no-duplicates", action="store_true", help="skip the 'voxelflow (duplicates)' rows")
    parser.add_argument(
        "--orthanc-pg",
        action=argparse.BooleanOptionalAction,
        default=PG_INDEX_PLUGIN.exists(),
        help="also Orthanc with its PostgreSQL index plugin (default: when Debian orthanc-postgresql is installed)",
    )
    parser.add_argument(
        "--fsync",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="PostgreSQL with fsync (default; --no-fsync: the test suite's throw-away setting)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="profile the ingest API with yappi (wall clock, all threads; needs yappi) into this pstats file",
    )
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "out" / "bench-ingest.json")
    args = parser.parse_args(argv)
    args.client_counts = [int(c) for c in str(args.clients).split(",") if c.strip()]
    if not args.client_counts or min(args.client_counts) < 1 or min(args.batch, args.repeat, args.workers) < 1:
        parser.error("--clients, --batch, --repeat and --workers must be positive")
    return args


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    if argv[:1] == ["--_profiled-server"]:
        profiled_server(argv[1], argv[2:])
        return 0
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    data = bench_data_dir()
    datasets = load_datasets(data, args.limit or None)
    log(
        f"{len(datasets)} files of {data / DATASET}, batch {args.batch}, clients {args.client_counts}, "
        f"repeat {args.repeat}"
    )

    def fresh_workload() -> Workload:
        return make_workload(with_fresh_uids(datasets), args.batch)

    rows: list[Row] = []
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="vf-bench-") as tmp,
        Servers(Path(tmp), args.fsync, args.profile, args.workers, args.orthanc_pg) as servers,
    ):
        targets = {
            "voxelflow": Target(
                "voxelflow",
                f"{servers.ingest_url}/dicomweb/studies",
                {"Authorization": f"Bearer {servers.token}"},
            ),
            ORTHANC: Target(ORTHANC, f"{servers.stack.orthanc_url}/dicom-web/studies", {}),
        }
        if servers.orthanc_pg:
            targets[ORTHANC_PG] = Target(ORTHANC_PG, f"{servers.orthanc_pg_url}/dicom-web/studies", {})
        for name, target in targets.items():  # warm-up: one request each, not timed
            warm = make_workload(with_fresh_uids(datasets[: args.batch]), args.batch)
            _, stored, failed, errors = run_load(target, warm, 1, f"{name:<24} warm-up")
            if errors or stored == 0:
                raise RuntimeError(f"{name}: warm-up request failed ({errors} HTTP errors, {failed} failed)")
        for rep in range(1, args.repeat + 1):
            for clients in args.client_counts:
                for name, target in targets.items():
                    work = fresh_workload()  # encoded before the timer starts
                    rows.append(measure(target, name, work, clients, rep, servers.process_roots))
                    if name == "voxelflow" and not args.no_duplicates:
                        dup = "voxelflow (duplicates)"
                        rows.append(measure(target, dup, work, clients, rep, servers.process_roots))
    summary = summarise(rows)
    print()
    print(
        f"STOW-RS throughput, {DATASET}, batch {args.batch}, repeat {args.repeat}, "
        f"{servers.workers} ingest API worker(s), PostgreSQL fsync {'on' if args.fsync else 'off'} "
        "(MB = 10^6 bytes of DICOM; ratio = inst/s / Orthanc's at the same client count, ratio PG = / Orthanc's "
        "with the PostgreSQL index; CPU ms/inst = CPU time of all server processes per instance)"
    )
    print(table(summary))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "dataset": DATASET,
        "files": len(datasets),
        "batch": args.batch,
        "clients": args.client_counts,
        "repeat": args.repeat,
        "api_workers": servers.workers,
        "orthanc_postgresql_index": servers.orthanc_pg,
        "postgres_fsync": args.fsync,
        "cpus": os.cpu_count(),
        "wall_seconds": round(time.monotonic() - started, 1),
        "summary": [asdict(r) for r in summary],
        "runs": [asdict(r) for r in rows],
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.json}")
    if args.profile:
        log(f"profile of the ingest API: {args.profile} (python -m pstats {args.profile})")
    bad = any(r.http_errors or r.failed for r in rows if r.server != "voxelflow (duplicates)")
    return 1 if bad else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        log("interrupted; servers stopped")
        sys.exit(130)
