"""Run the stack's voxelflow processes from their images (``make up-images``) instead of as host processes.

Why: the images are what a cluster runs. Running every API and worker of ``services/stack.toml`` from
its image, the way the Helm chart runs its pods (UID 10001, read-only root filesystem with a tmpfs
``/tmp``, all capabilities dropped, no new privileges, configured only through environment variables),
against the same local servers, proves the images work together before a cluster is involved.

Pure command-line construction lives here so that it is unit-tested without podman; the manager wraps
the ``podman run`` command in an ordinary :class:`~shared.stack.process.Component` (the foreground
``podman run`` is the process the stack tracks; ``--sig-proxy`` passes its SIGTERM to the container).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

#: the UID/GID the Dockerfiles create and the chart's securityContext runs as
CONTAINER_UID = 10001
IMAGE_REPOSITORY = "localhost/voxelflow"
#: host variables a container also gets (what a host process would have inherited that changes a service)
PASSTHROUGH_PREFIXES = ("VOXELFLOW_", "MLFLOW_", "AWS_")
#: the stack's own knobs: they configure the stack, not a service
STACK_ONLY_PREFIX = "VOXELFLOW_STACK_"
TMPFS_TMP = "/tmp:rw,size=2g,mode=1777"


@dataclass(frozen=True)
class ContainerMode:
    """Whether and how the stack runs its services from images (``VOXELFLOW_STACK_IMAGES``)."""

    tag: str = "dev"
    podman: str = "podman"
    #: ``CONTAINERS_CONF`` written by ci/build-images.sh (runc, default ulimits) when it exists
    containers_conf: Path | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str], repo_root: Path) -> ContainerMode | None:
        """None unless ``VOXELFLOW_STACK_IMAGES`` is set to something true (``1``, ``true``, ``yes``)."""
        if env.get("VOXELFLOW_STACK_IMAGES", "").strip().lower() not in ("1", "true", "yes", "on"):
            return None
        conf = env.get("CONTAINERS_CONF") or str(repo_root / ".voxelflow" / "images" / "containers.conf")
        return cls(
            tag=env.get("VOXELFLOW_STACK_IMAGE_TAG", "dev") or "dev",
            podman=env.get("VOXELFLOW_STACK_PODMAN", "podman") or "podman",
            containers_conf=Path(conf) if Path(conf).exists() else None,
        )


def image_for(target: str, tag: str) -> str:
    """The image of the service whose code ``target`` names: ``services.ingest.main:app`` → ``…/ingest:TAG``.

    Each image holds one service's package (services/<name>/Dockerfile), so the package is the image."""
    match = re.match(r"services\.([a-z_][a-z0-9_]*)[.:]", target)
    if not match:
        raise ValueError(f"{target!r} is not a module of a service package (services.<name>.…): no image runs it")
    return f"{IMAGE_REPOSITORY}/{match.group(1)}:{tag}"


def container_name(state_dir: Path, component: str) -> str:
    """``vf-<8 hex of the state dir>-<component>``: stacks with different state dirs never share a name,
    so one stack's ``down`` cannot remove another's containers."""
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]
    return f"vf-{digest}-{component}"


def container_command(host_argv: Sequence[str]) -> list[str]:
    """The host command line with the host's Python replaced by the image's (``python`` on its PATH).

    The image's entrypoint execs any command it does not know (``api``/``worker`` aside), so the stack's
    uvicorn / Celery / ``python -m`` command lines run unchanged: same options, same 127.0.0.1 ports."""
    if not host_argv:
        raise ValueError("empty command line")
    return ["python", *host_argv[1:]]


def container_env(
    host_env: Mapping[str, str], stack_env: Mapping[str, str], component_env: Mapping[str, str]
) -> dict[str, str]:
    """What the container is configured with: the host's service variables, the stack's URLs for what the
    component requires, then the component's own (the same precedence a host process gets)."""
    passed = {
        key: value
        for key, value in host_env.items()
        if key.startswith(PASSTHROUGH_PREFIXES) and not key.startswith(STACK_ONLY_PREFIX)
    }
    return {**passed, **stack_env, **component_env}


#: the host's key file (``services/stack.toml``) and the variable a container gets the key itself in
DEID_KEY_FILE_VARIABLE = "VOXELFLOW_DEID_KEY_FILE"
DEID_KEY_VARIABLE = "VOXELFLOW_DEID_KEY"


def inline_deid_key(env: Mapping[str, str], read_key: Callable[[Path], str]) -> dict[str, str]:
    """``env`` with the de-identification key file replaced by the key, as the chart passes it (a Secret).

    Why: the stack runs as root and keeps the key in a 0600 file of its state directory; the container
    runs as UID 10001 and could not read it, and loosening the file's mode would expose the key that
    every pseudonym depends on. The key travels instead in the container's 0600 env file, the way a pod
    gets ``VOXELFLOW_DEID_KEY`` from ``secretKeyRef``. A key already given in ``env`` wins (it is what a
    host process would have used); ``read_key`` creates the file when it does not exist yet, so host and
    container processes of one state directory share one key."""
    inlined = dict(env)
    key_file = inlined.pop(DEID_KEY_FILE_VARIABLE, None)
    if key_file is not None and not inlined.get(DEID_KEY_VARIABLE):
        inlined[DEID_KEY_VARIABLE] = read_key(Path(key_file))
    return inlined


def env_file_text(env: Mapping[str, str]) -> str:
    """``KEY=VALUE`` lines for ``podman run --env-file`` (values verbatim; a newline cannot be expressed)."""
    lines = []
    for key, value in sorted(env.items()):
        if "\n" in value or "\r" in value:
            raise ValueError(f"{key}: a value with a line break cannot go into an env file")
        lines.append(f"{key}={value}")
    return "\n".join(lines) + "\n"


def podman_run_argv(
    mode: ContainerMode,
    *,
    name: str,
    image: str,
    command: Sequence[str],
    env_file: Path,
    mounts: Sequence[Path] = (),
) -> list[str]:
    """``podman run`` in the foreground, as the chart's pod securityContext runs the image.

    ``--network host`` keeps every port on the host's 127.0.0.1 (the stack's servers and the other
    services); ``--replace`` takes over a container left by a killed run; ``--rm`` removes it on exit.
    ``mounts`` are host paths mounted at the same path (the state files the stack's variables name)."""
    argv = [
        mode.podman,
        "run",
        "--rm",
        "--replace",
        "--name",
        name,
        "--network",
        "host",
        "--read-only",
        "--tmpfs",
        TMPFS_TMP,
        "--user",
        f"{CONTAINER_UID}:{CONTAINER_UID}",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--sig-proxy=true",
        "--stop-timeout",
        "15",
        "--env-file",
        str(env_file),
    ]
    for path in mounts:
        argv += ["--volume", f"{path}:{path}:rw"]
    return [*argv, image, *command]


def podman_remove_argv(mode: ContainerMode, name: str) -> list[str]:
    """Stop (SIGTERM, then SIGKILL after 10 s) and remove the container; succeeds when it is already gone."""
    return [mode.podman, "rm", "--force", "--ignore", "--time", "10", name]
