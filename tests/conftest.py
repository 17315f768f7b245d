"""Session fixtures: the real servers voxelflow talks to, started through :mod:`shared.stack`.

One private stack per test session lives in pytest's temp dir on a free port range (so it never
collides with a developer's ``make up`` stack on 17000+), and is torn down at the end. Components start
on first use: a run that needs only PostgreSQL does not wait for Orthanc, and MLflow (~15 s) starts only
when a test asks for ``mlflow_uri``.

Overrides for machines that already run servers (CI machines may not, so the default is private ones):
``VOXELFLOW_TEST_POSTGRES_URL`` (e.g. postgresql://postgres@127.0.0.1:5432/postgres; a fresh database
is created and dropped) and ``VOXELFLOW_TEST_REDIS_URL`` (e.g. redis://127.0.0.1:6379; an empty db index
is used and flushed afterwards).
"""

from __future__ import annotations

import os
import random
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.stack import PortOffsets, Stack, StackConfig
from shared.stack.manager import INFRA
from shared.stack.process import port_in_use


def free_base_port(span: int = PortOffsets.SPAN) -> int:
    """A base port whose whole range is free, away from the dev stack's 17000+ and ephemeral ports."""
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(20000, 32000 - span, 10)
        if not any(port_in_use(base + offset) for offset in range(span)):
            return base
    raise RuntimeError("no free port range found between 20000 and 32000")


@dataclass(frozen=True)
class OrthancServer:
    url: str
    dicom_port: int
    aet: str
    host: str = "127.0.0.1"
    #: voxelflow's C-STORE receiver as this Orthanc knows it (the C-MOVE destination of a DIMSE pull)
    receiver_aet: str = "VOXELFLOW"
    receiver_port: int = 0


class SessionStack:
    """A private :class:`Stack` whose components are started on demand and stopped at session end."""

    def __init__(self, state_dir: Path, log: Callable[[str], None]) -> None:
        self.token = secrets.token_hex(4)
        external: dict[str, str] = {}
        if os.environ.get("VOXELFLOW_TEST_POSTGRES_URL"):
            external["postgres"] = os.environ["VOXELFLOW_TEST_POSTGRES_URL"]
        if os.environ.get("VOXELFLOW_TEST_REDIS_URL"):
            external["redis"] = os.environ["VOXELFLOW_TEST_REDIS_URL"]
        config = StackConfig(
            state_dir=state_dir,
            base_port=free_base_port(),
            external=external,
            # unique names, so a shared PostgreSQL (override) never sees two sessions' tables mixed
            app_database=f"vf_test_{self.token}",
            mlflow_database=f"vf_test_{self.token}_mlflow",
            ephemeral=True,
        )
        self.stack = Stack(config, log=log)
        self.log = log
        self.started: set[str] = set()

    def ensure(self, *names: str) -> Stack:
        missing = [n for n in names if n not in self.started]
        if missing:
            self.log(f"test stack: starting {', '.join(missing)} in {self.stack.state_dir}")
            self.stack.up(only=missing)
            for name in missing:
                self.started.update((name, *self.stack.components[name].requires))
        return self.stack

    def close(self) -> None:
        if "postgres" in self.started and "postgres" in self.stack.config.external:
            self._drop_databases()
        self.stack.down(purge=True)

    def _drop_databases(self) -> None:
        import psycopg

        with psycopg.connect(self.stack.postgres_admin_url, autocommit=True) as conn:
            for db in (self.stack.config.app_database, self.stack.config.mlflow_database):
                conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


@pytest.fixture(scope="session")
def test_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SessionStack]:
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")

    def log(message: str) -> None:
        """Progress goes to the terminal even while pytest captures output (server starts take seconds)."""
        if reporter is None or capture is None:
            print(message)
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line(message)

    session = SessionStack(tmp_path_factory.mktemp("stack"), log)
    try:
        yield session
    finally:
        session.close()


@pytest.fixture(scope="session")
def postgres_url(test_stack: SessionStack) -> str:
    """SQLAlchemy URL (``postgresql+psycopg://``) of a database created for this session."""
    stack = test_stack.ensure("postgres")
    return stack.database_url(stack.config.app_database)


@pytest.fixture(scope="session")
def redis_url(test_stack: SessionStack) -> Iterator[str]:
    """``redis://…/N``: db 0 of a private server, or an empty db index of the override server."""
    stack = test_stack.ensure("redis")
    if "redis" not in stack.config.external:
        yield stack.redis_url
        return
    import redis

    base = stack.redis_url.rsplit("/", 1)[0]
    for index in range(15, 0, -1):
        client = redis.Redis.from_url(f"{base}/{index}")
        if client.dbsize() == 0:
            client.set(f"voxelflow-test-claim-{test_stack.token}", "1")  # claim it against a parallel run
            try:
                yield f"{base}/{index}"
            finally:
                client.flushdb()
                client.close()
            return
        client.close()
    pytest.fail(f"VOXELFLOW_TEST_REDIS_URL={base}: no empty db index among 1..15")


@pytest.fixture(scope="session")
def s3_url(test_stack: SessionStack) -> str:
    """``s3://…/BUCKET?secure=false`` of a bucket created for this session on the private SeaweedFS."""
    stack = test_stack.ensure("s3")
    bucket = f"test-{test_stack.token}"
    client = stack.minio_client()
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
    return stack.storage_url(bucket)


@pytest.fixture(scope="session")
def new_s3_bucket(test_stack: SessionStack, s3_url: str) -> Callable[[str], str]:
    """A factory of fresh, empty buckets on the session's S3: for tests that count what they write
    (content-addressed keys such as the preprocessing cache are shared by every test using ``s3_url``)."""
    stack = test_stack.stack
    client = stack.minio_client()

    def create(prefix: str) -> str:
        bucket = f"{prefix}-{secrets.token_hex(4)}"
        client.make_bucket(bucket)
        return stack.storage_url(bucket)

    return create


@pytest.fixture(scope="session")
def orthanc(test_stack: SessionStack) -> OrthancServer:
    """The private Orthanc PACS: HTTP/DICOMweb at ``.url``, DICOM at ``.dicom_port`` with AET ``.aet``.

    Its configuration names voxelflow's receiver (the stack's ``ingest-dimse`` row, ``dicom_ae``) as a
    modality, read back here from Orthanc itself; an external Orthanc without it gets one registered."""
    import httpx

    stack = test_stack.ensure("orthanc")
    with httpx.Client(base_url=stack.orthanc_url, timeout=30) as client:
        modalities = client.get("/modalities", params={"expand": ""}).json()
        known = [m for m in modalities.values() if m["AET"] == "VOXELFLOW" and m["Host"] == "127.0.0.1"]
        if known:
            port = int(known[0]["Port"])
        else:
            from tests.service_harness import free_port

            port = free_port()
            body = {"AET": "VOXELFLOW", "Host": "127.0.0.1", "Port": port}
            client.put(f"/modalities/voxelflow-{test_stack.token}", json=body).raise_for_status()
    return OrthancServer(
        url=stack.orthanc_url, dicom_port=stack.orthanc_dicom_port, aet=stack.config.orthanc_aet, receiver_port=port
    )


@pytest.fixture(scope="session")
def silent_peer() -> Iterator[int]:
    """A port that completes the TCP handshake and then never says a word: a PACS that hangs."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        yield int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def mlflow_uri(test_stack: SessionStack) -> Iterator[str]:
    """Tracking URI of a private MLflow server (PostgreSQL backend, S3 artifacts); started on first use.

    The S3 variables MLflow clients need for direct artifact access are set for the session, too.
    """
    from tests.service_harness import patched_environ

    stack = test_stack.ensure("mlflow")
    with patched_environ({k: v for k, v in stack.env_vars(INFRA).items() if k.startswith(("AWS_", "MLFLOW_"))}):
        yield stack.mlflow_uri


@dataclass(frozen=True)
class TritonServer:
    """A private tritonserver (explicit model control): gRPC at ``url``, reading ``model_repository``."""

    url: str
    model_repository: Path


@pytest.fixture(scope="session")
def triton_server(test_stack: SessionStack) -> TritonServer:
    """The CPU tritonserver from .venv-triton (``make install-triton``), started on first use (~2 s)."""
    stack = test_stack.ensure("triton")
    return TritonServer(url=stack.triton_url, model_repository=stack.triton_model_repository)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The bundled real data (``../shared/data``, read in place; see tests.service_harness)."""
    from tests.service_harness import require_shared_data

    return require_shared_data()


@pytest.fixture(scope="session")
def hippocampus_dir(shared_data: Path) -> Path:
    """Medical Segmentation Decathlon Task04 (hippocampus MRI with anterior/posterior labels)."""
    return shared_data / "msd_task04_hippocampus"
