"""The local stack itself: every component answers a real client, and ``down`` frees every port.

Lifecycle tests use their own throw-away stack (not the session one the fixtures share). MLflow is
checked through the lazy ``mlflow_uri`` fixture so the suite starts it at most once.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from shared.stack import PortOffsets, Stack, StackConfig, StackError
from shared.stack.process import port_in_use
from shared.storage import open_object_store
from tests.conftest import OrthancServer, free_base_port

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPONENTS = ["postgres", "redis", "s3", "orthanc"]


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(
        StackConfig(state_dir=tmp_path_factory.mktemp("own-stack"), base_port=free_base_port(), ephemeral=True)
    )
    stack.up(only=COMPONENTS)
    try:
        yield stack
    finally:
        stack.down(purge=True)


@pytest.fixture
def scratch_stack(tmp_path: Path) -> Iterator[Stack]:
    """A stack for one test, purged afterwards even when the test fails."""
    stack = Stack(StackConfig(state_dir=tmp_path / "s", base_port=free_base_port(), ephemeral=True))
    try:
        yield stack
    finally:
        stack.down(purge=True)


def test_up_components_answer_real_clients(own_stack: Stack) -> None:
    env = dict(line.split("=", 1) for line in own_stack.env_file.read_text().splitlines() if "=" in line)
    assert env["VOXELFLOW_DATABASE_URL"].startswith("postgresql+psycopg://")

    with psycopg.connect(env["VOXELFLOW_DATABASE_URL"].replace("+psycopg", "")) as conn:
        row = conn.execute("SELECT current_database(), current_user").fetchone()
    assert row == ("voxelflow", "postgres")
    with psycopg.connect(own_stack.database_url("mlflow").replace("+psycopg", "")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)

    client = redis.Redis.from_url(env["VOXELFLOW_BROKER_URL"])
    assert client.ping() is True
    client.close()

    store = open_object_store(env["VOXELFLOW_STORAGE_URL"])
    store.put_bytes("hello.txt", b"hello")
    assert store.get_bytes("hello.txt") == b"hello"
    assert own_stack.minio_client().bucket_exists("mlflow")

    with urllib.request.urlopen(f"{env['VOXELFLOW_ORTHANC_URL']}/system", timeout=5) as response:
        system = json.load(response)
    assert system["DicomAet"] == "ORTHANC"
    assert system["DicomPort"] == int(env["VOXELFLOW_ORTHANC_DICOM_PORT"])
    with urllib.request.urlopen(f"{env['VOXELFLOW_ORTHANC_URL']}/dicom-web/studies", timeout=5) as response:
        assert response.status in (200, 204)  # the DICOMweb plugin is loaded

    echo = subprocess.run(
        [
            "echoscu",
            "-aet",
            "ANY-MODALITY",
            "-aec",
            "ORTHANC",
            "127.0.0.1",
            env["VOXELFLOW_ORTHANC_DICOM_PORT"],
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert echo.returncode == 0, echo.stderr


def test_second_up_skips_healthy_components(own_stack: Stack) -> None:
    pids = {name: own_stack.procs.running_pid(name) for name in COMPONENTS}
    own_stack.up(only=COMPONENTS)
    assert {name: own_stack.procs.running_pid(name) for name in COMPONENTS} == pids
    states = {name: state for name, state, _ in own_stack.status()}
    assert all(states[name].startswith("running") for name in COMPONENTS)
    assert states["mlflow"] == "stopped"


def test_cli_status_and_env(own_stack: Stack) -> None:
    env = {
        **os.environ,
        "VOXELFLOW_STACK_DIR": str(own_stack.state_dir),
        "VOXELFLOW_STACK_BASE_PORT": str(own_stack.config.base_port),
    }
    status = subprocess.run(
        [sys.executable, "-m", "shared.stack", "status"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert status.returncode == 0, status.stderr
    assert "redis" in status.stdout and "running" in status.stdout
    printed = subprocess.run(
        [sys.executable, "-m", "shared.stack", "env"], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert printed.returncode == 0 and "VOXELFLOW_STORAGE_URL=s3://" in printed.stdout


def test_port_taken_by_a_stranger_gives_a_clear_error(scratch_stack: Stack) -> None:
    stack = scratch_stack
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", stack.config.port(PortOffsets.REDIS)))
        squatter.listen()
        with pytest.raises(StackError, match="taken by another program"):
            stack.up(only=["redis"])


def run_stack_cli(*args: str, state_dir: Path, base_port: int, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m shared.stack ARGS`` on its own state dir and ports, as a user runs it."""
    environ = {
        **os.environ,
        "VOXELFLOW_STACK_DIR": str(state_dir),
        "VOXELFLOW_STACK_BASE_PORT": str(base_port),
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "shared.stack", *args],
        cwd=REPO_ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The CLI's error: exit status 1 and exactly one line on stderr, no traceback."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("voxelflow stack: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("command", ["status", "env"])
def test_cli_says_make_up_when_the_stack_is_not_up(tmp_path: Path, command: str) -> None:
    result = run_stack_cli(command, state_dir=tmp_path / "s", base_port=free_base_port())
    line = one_error_line(result)
    assert "not up" in line and "make up" in line
    assert result.stdout == ""


def test_cli_env_left_from_a_stopped_stack_says_make_up(tmp_path: Path) -> None:
    (tmp_path / "stack.env").write_text("VOXELFLOW_BROKER_URL=redis://127.0.0.1:1/0\n")
    line = one_error_line(run_stack_cli("env", state_dir=tmp_path, base_port=free_base_port()))
    assert "no longer runs" in line and "make up" in line


def test_cli_port_in_use_names_port_component_and_base_port(tmp_path: Path) -> None:
    base = free_base_port()
    port = base + PortOffsets.REDIS
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        line = one_error_line(run_stack_cli("up", "--only", "redis", state_dir=tmp_path / "s", base_port=base))
    assert line.startswith("voxelflow stack: redis: port ")
    assert f"port {port} " in line and "taken by another program" in line
    assert "VOXELFLOW_STACK_BASE_PORT=" in line and "make up" in line
    assert not port_in_use(port)


def test_cli_missing_binary_names_package_and_make_target(tmp_path: Path) -> None:
    """A PATH without redis-server (found only on PATH): ``up`` names the Debian package and the make target,
    before it starts anything; ``status`` still works on such a machine."""
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    base = free_base_port()
    result = run_stack_cli("up", "--only", "redis", state_dir=tmp_path / "s", base_port=base, PATH=str(empty_bin))
    line = one_error_line(result)
    assert "redis-server" in line and "Debian package redis-server" in line and "make install-system" in line
    assert not port_in_use(base + PortOffsets.REDIS)
    status = run_stack_cli("status", state_dir=tmp_path / "s", base_port=base, PATH=str(empty_bin))
    assert "make up" in one_error_line(status)


@pytest.mark.parametrize(("variable", "expected"), [("abc", "is not a port number"), ("80", "out of range")])
def test_cli_bad_base_port_is_one_line(tmp_path: Path, variable: str, expected: str) -> None:
    result = run_stack_cli("status", state_dir=tmp_path, base_port=0, VOXELFLOW_STACK_BASE_PORT=variable)
    assert expected in one_error_line(result)


def test_a_crashing_component_points_at_its_log(scratch_stack: Stack) -> None:
    stack = scratch_stack
    port = stack.config.port(PortOffsets.SERVICES)
    code = "import sys; print('boom: no config'); sys.exit(3)"
    stack.components["bogus"] = stack.service("bogus", [sys.executable, "-c", code], (), port, "/healthz")
    with pytest.raises(StackError) as error:
        stack.up(only=["bogus"])
    message = str(error.value)
    assert "exited with code 3" in message
    assert str(stack.procs.logfile("bogus")) in message and "boom: no config" in message


def test_down_frees_every_port_and_is_idempotent(scratch_stack: Stack) -> None:
    stack = scratch_stack
    stack.up(only=COMPONENTS)
    ports = [p for name in COMPONENTS for p in stack.components[name].ports]
    assert all(port_in_use(p) for p in (stack.config.port(PortOffsets.POSTGRES), stack.orthanc_dicom_port))
    stack.down()
    assert [p for p in ports if port_in_use(p)] == []
    assert all(state == "stopped" for _, state, _ in stack.status())
    stack.down()  # nothing left to stop: no error
    stack.down(purge=True)
    assert not stack.state_dir.exists()


def test_session_fixtures(postgres_url: str, redis_url: str, s3_url: str, orthanc: OrthancServer) -> None:
    with psycopg.connect(postgres_url.replace("+psycopg", "")) as conn:
        (name,) = conn.execute("SELECT current_database()").fetchone() or ("",)
    assert name.startswith("vf_test_")
    assert redis.Redis.from_url(redis_url).ping()
    store = open_object_store(s3_url)
    store.put_stream("fixture/check", io.BytesIO(b"ok"))
    assert store.get_bytes("fixture/check") == b"ok"
    with urllib.request.urlopen(f"{orthanc.url}/system", timeout=5) as response:
        assert json.load(response)["DicomAet"] == orthanc.aet
    # Orthanc's configuration names the stack's DICOM receiver (services/stack.toml, dicom_ae) as a modality
    from shared.stack.components import dicom_modalities, load_table

    base = orthanc.dicom_port - PortOffsets.ORTHANC_DICOM
    assert dicom_modalities(load_table(), base)["ingest-dimse"] == ["VOXELFLOW", "127.0.0.1", orthanc.receiver_port]


def test_mlflow_fixture_serves_health_and_tracking(mlflow_uri: str) -> None:
    with urllib.request.urlopen(f"{mlflow_uri}/health", timeout=10) as response:
        assert response.status == 200
    request = urllib.request.Request(
        f"{mlflow_uri}/api/2.0/mlflow/experiments/create",
        data=json.dumps({"name": "stack-smoke"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.load(response)["experiment_id"]
