"""The stack's container mode (``make up-images``) without podman: command lines, environment, names, cleanup.

The containers themselves run in ``make up-images`` / ``make demo-images`` (outside ``make test``: they need
the images ``make images`` builds); here the logic that decides how they run is checked against the chart's
own securityContext, so that the local containers cannot drift from the pods.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shared.registry import git_sha
from shared.stack import Stack, StackConfig
from shared.stack.containers import (
    CONTAINER_UID,
    ContainerMode,
    container_command,
    container_env,
    container_name,
    env_file_text,
    image_for,
    inline_deid_key,
    podman_run_argv,
)
from shared.stack.manager import REPO_ROOT, SERVICES_GROUP

VALUES = yaml.safe_load((REPO_ROOT / "charts" / "voxelflow" / "values.yaml").read_text())


def _option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, value in enumerate(argv[:-1]) if value == flag]


@pytest.mark.parametrize(
    ("target", "image"),
    [
        ("services.ingest.main:app", "localhost/voxelflow/ingest:abc"),
        ("services.training_worker.worker", "localhost/voxelflow/training_worker:abc"),
        ("services.ingest.dimse", "localhost/voxelflow/ingest:abc"),
    ],
)
def test_the_service_package_names_the_image(target: str, image: str) -> None:
    assert image_for(target, "abc") == image


def test_a_module_outside_the_services_has_no_image() -> None:
    with pytest.raises(ValueError, match="no image"):
        image_for("shared.stack.triton", "dev")


def test_the_run_command_matches_the_charts_security_context(tmp_path: Path) -> None:
    security = VALUES["containerSecurityContext"]
    argv = podman_run_argv(
        ContainerMode(),
        name="vf-1-ingest-api",
        image="localhost/voxelflow/ingest:dev",
        command=["python", "-m", "uvicorn", "services.ingest.main:app", "--host", "127.0.0.1", "--port", "17020"],
        env_file=tmp_path / "ingest-api.env",
        mounts=[tmp_path],
    )
    assert argv[:2] == ["podman", "run"] and "-d" not in argv  # foreground: the stack tracks this process
    assert (
        _option(argv, "--user") == [f"{security['runAsUser']}:{security['runAsGroup']}"] == [f"{CONTAINER_UID}:10001"]
    )
    assert security["readOnlyRootFilesystem"] is True and "--read-only" in argv
    assert security["capabilities"]["drop"] == ["ALL"] and _option(argv, "--cap-drop") == ["ALL"]
    assert security["allowPrivilegeEscalation"] is False and _option(argv, "--security-opt") == ["no-new-privileges"]
    tmpfs = _option(argv, "--tmpfs")
    assert len(tmpfs) == 1 and tmpfs[0].startswith("/tmp:") and "size=2g" in tmpfs[0]
    assert VALUES["tmpSizeLimit"] == "2Gi"
    assert _option(argv, "--network") == ["host"]
    assert _option(argv, "--env-file") == [str(tmp_path / "ingest-api.env")]
    assert _option(argv, "--volume") == [f"{tmp_path}:{tmp_path}:rw"]
    image_at = argv.index("localhost/voxelflow/ingest:dev")
    assert argv[image_at + 1 :][:3] == ["python", "-m", "uvicorn"] and argv[-1] == "17020"


def test_the_host_python_is_replaced_by_the_images() -> None:
    assert container_command([sys.executable, "-m", "celery", "-A", "m", "worker"]) == [
        "python",
        "-m",
        "celery",
        "-A",
        "m",
        "worker",
    ]
    with pytest.raises(ValueError):
        container_command([])


def test_names_differ_between_state_dirs(tmp_path: Path) -> None:
    one, two = container_name(tmp_path / "a", "ingest-api"), container_name(tmp_path / "b", "ingest-api")
    assert one != two and one.endswith("-ingest-api") and one == container_name(tmp_path / "a", "ingest-api")


def test_environment_precedence_and_what_stays_on_the_host() -> None:
    host = {
        "VOXELFLOW_MODEL_NAME": "from-host",
        "VOXELFLOW_SITE": "host-site",
        "VOXELFLOW_STACK_IMAGES": "1",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "PATH": "/usr/bin",
        "HOME": "/root",
    }
    env = container_env(host, {"VOXELFLOW_DATABASE_URL": "postgresql+psycopg://x"}, {"VOXELFLOW_SITE": "site-1"})
    assert env == {
        "VOXELFLOW_MODEL_NAME": "from-host",
        "VOXELFLOW_SITE": "site-1",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "VOXELFLOW_DATABASE_URL": "postgresql+psycopg://x",
    }


def test_env_file_keeps_json_values_verbatim_and_refuses_line_breaks() -> None:
    text = env_file_text({"B": '{"orthanc": {"url": "http://127.0.0.1:1/dicom-web"}}', "A": "x=y"})
    assert text == 'A=x=y\nB={"orthanc": {"url": "http://127.0.0.1:1/dicom-web"}}\n'
    with pytest.raises(ValueError, match="line break"):
        env_file_text({"A": "one\ntwo"})


def test_the_deid_key_file_becomes_the_key_itself(tmp_path: Path) -> None:
    read: list[Path] = []

    def read_key(path: Path) -> str:
        read.append(path)
        return "k" * 64

    env = {"VOXELFLOW_DEID_KEY_FILE": str(tmp_path / "deid.key"), "VOXELFLOW_SITE": "s"}
    assert inline_deid_key(env, read_key) == {"VOXELFLOW_DEID_KEY": "k" * 64, "VOXELFLOW_SITE": "s"}
    assert read == [tmp_path / "deid.key"]
    given = {**env, "VOXELFLOW_DEID_KEY": "from-host"}
    assert inline_deid_key(given, read_key) == {"VOXELFLOW_DEID_KEY": "from-host", "VOXELFLOW_SITE": "s"}
    assert inline_deid_key({"VOXELFLOW_SITE": "s"}, read_key) == {"VOXELFLOW_SITE": "s"} and len(read) == 1


def test_mode_is_off_unless_asked_for(tmp_path: Path) -> None:
    assert ContainerMode.from_env({}, tmp_path) is None
    assert ContainerMode.from_env({"VOXELFLOW_STACK_IMAGES": "0"}, tmp_path) is None
    mode = ContainerMode.from_env({"VOXELFLOW_STACK_IMAGES": "1", "VOXELFLOW_STACK_IMAGE_TAG": "abc"}, tmp_path)
    assert mode == ContainerMode(tag="abc", podman="podman", containers_conf=None)


def test_every_service_of_the_table_runs_from_its_image_and_the_servers_stay_host_processes(tmp_path: Path) -> None:
    config = StackConfig(state_dir=tmp_path / "s", base_port=29000, images=ContainerMode(tag="t"))
    stack = Stack(config, log=lambda _: None)
    plain = Stack(StackConfig(state_dir=tmp_path / "s", base_port=29000), log=lambda _: None)
    services = [c for c in stack.components.values() if c.optional_group == SERVICES_GROUP]
    assert len(services) >= 10
    for component in services:
        host = plain.components[component.name]
        assert component.argv[:2] == ["podman", "run"], component.name
        image = next(a for a in component.argv if a.startswith("localhost/voxelflow/"))
        command = component.argv[component.argv.index(image) + 1 :]
        assert command == ["python", *host.argv[1:]]  # the same uvicorn/celery options and 127.0.0.1 port
        assert (component.url, component.ports, component.requires) == (host.url, host.ports, host.requires)
        assert host.env.items() <= component.env.items()  # e.g. the demo reads VOXELFLOW_BACKEND from it
        assert _option(list(component.argv), "--name") == [container_name(stack.state_dir, component.name)]
    for name in ("postgres", "redis", "s3", "orthanc", "mlflow", "triton"):
        assert stack.components[name].argv == plain.components[name].argv


def test_prepare_writes_a_private_env_file_and_down_removes_the_container(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The env file (it holds the S3 secret) is 0600; ``down`` asks podman to remove the container even
    when the stack is no longer in container mode (``make down`` after ``make up-images``)."""
    # a key in this process's environment (an earlier test's) would win over the stack's key file
    monkeypatch.delenv("VOXELFLOW_DEID_KEY", raising=False)
    monkeypatch.delenv("VOXELFLOW_DEID_KEY_FILE", raising=False)
    calls = tmp_path / "podman-calls"
    fake = tmp_path / "podman"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    state = tmp_path / "s"
    stack = Stack(
        StackConfig(state_dir=state, base_port=29100, images=ContainerMode(podman=str(fake))), log=lambda _: None
    )
    component = stack.components["preprocessing-api"]
    assert component.prepare is not None
    component.prepare()
    env_file = stack.procs.run_dir / "preprocessing-api.env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    lines = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert lines["VOXELFLOW_STORAGE_URL"].startswith("s3://") and "VOXELFLOW_DATABASE_URL" in lines
    if os.geteuid() == 0:
        assert state.stat().st_uid == CONTAINER_UID  # the non-root container writes the state files
    # the key the stack keeps in its 0600 file (root's, as root) reaches ingest and inference as a value
    keys = set()
    for name in ("ingest-api", "inference-worker"):
        prepare = stack.components[name].prepare
        assert prepare is not None
        prepare()
        sent = dict(line.split("=", 1) for line in (stack.procs.run_dir / f"{name}.env").read_text().splitlines())
        assert "VOXELFLOW_DEID_KEY_FILE" not in sent
        keys.add(sent["VOXELFLOW_DEID_KEY"])
    key_file = state / "deid.key"
    assert keys == {key_file.read_text().strip()} and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert "VOXELFLOW_DEID_KEY" not in lines  # preprocessing makes no pseudonyms
    Stack(StackConfig(state_dir=state, base_port=29100), log=lambda _: None).down()
    names = [container_name(stack.state_dir, n) for n in ("preprocessing-api", "ingest-api", "inference-worker")]
    assert sorted(calls.read_text().splitlines()) == sorted(f"rm --force --ignore --time 10 {n}" for n in names)
    assert not env_file.exists()


def test_code_version_comes_from_the_image_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Images have no .git: lineage reads VOXELFLOW_GIT_SHA (build arg → ENV), else ``git rev-parse HEAD``."""
    monkeypatch.setenv("VOXELFLOW_GIT_SHA", "f" * 40)
    assert git_sha() == "f" * 40
    monkeypatch.delenv("VOXELFLOW_GIT_SHA")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    assert git_sha() == (head or "unknown")
