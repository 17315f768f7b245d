"""Running the CPU ``tritonserver`` that nvidia-pytriton bundles, outside pytriton.

The wheel carries a real Triton 2.x server binary, the Python backend (``libtriton_python.so``) and one
backend stub per Python version. Used as a plain server it needs three things the wheel does not set up:

- a backend directory laid out as Triton expects (``<dir>/python/libtriton_python.so``, the utils
  module and the stub built for the Triton environment's Python version);
- ``LD_LIBRARY_PATH`` with the directory of the ``libpython3.X.so`` that environment's interpreter uses
  (found through its ``sysconfig``: with a pyenv or python.org build it is not the system one) and the
  wheel's bundled libraries — otherwise the stub links the distribution's libpython and model loading
  fails with ``'_thread.RLock' object has no attribute '_recursion_count'``;
- that environment's ``site-packages`` on ``PYTHONPATH`` and its ``bin`` first on ``PATH``, so
  ``model.py`` imports numpy<2 and onnxruntime from .venv-triton, not the services' numpy 2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from shared.stack.process import StackError


@dataclass(frozen=True)
class TritonInstall:
    """Paths of one nvidia-pytriton installation inside a virtual environment."""

    venv: Path
    python_version: str  # "3.11"
    libdir: Path  # where the venv interpreter's libpython lives
    site_packages: Path
    package_dir: Path  # .../site-packages/pytriton/tritonserver

    @property
    def tritonserver(self) -> Path:
        return self.package_dir / "bin" / "tritonserver"

    @property
    def bundled_libs(self) -> Path:
        return self.site_packages / "nvidia_pytriton.libs"

    @property
    def stub(self) -> Path:
        return self.package_dir / "python_backend_stubs" / self.python_version / "triton_python_backend_stub"


def find_triton_install(venv: str | Path) -> TritonInstall:
    """Inspect ``venv`` (made by ``make install-triton``); a StackError says what is missing."""
    venv = Path(venv)
    python = venv / "bin" / "python"
    if not python.exists():
        raise StackError(f"no Triton environment at {venv}: run `make install-triton`")
    probe = (
        "import json, sysconfig, sys, importlib.util as u; spec = u.find_spec('pytriton');"
        "print(json.dumps({'v': '%d.%d' % sys.version_info[:2], 'libdir': sysconfig.get_config_var('LIBDIR'),"
        "'purelib': sysconfig.get_paths()['purelib'], 'pkg': spec.origin if spec else None}))"
    )
    try:
        out = subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise StackError(f"cannot run {python}: {exc}") from exc
    info = json.loads(out.stdout)
    if not info["pkg"]:
        raise StackError(f"nvidia-pytriton is not installed in {venv}: run `make install-triton`")
    install = TritonInstall(
        venv=venv,
        python_version=info["v"],
        libdir=Path(info["libdir"]),
        site_packages=Path(info["purelib"]),
        package_dir=Path(info["pkg"]).parent / "tritonserver",
    )
    for path in (install.tritonserver, install.stub):
        if not path.exists():
            raise StackError(f"{path} is missing from nvidia-pytriton in {venv} (Python {install.python_version})")
    return install


def prepare_backend_dir(install: TritonInstall, backends_dir: str | Path) -> Path:
    """Lay out ``<backends_dir>/python`` with the backend library, its utils module and the right stub."""
    target = Path(backends_dir) / "python"
    target.mkdir(parents=True, exist_ok=True)
    sources = (
        install.package_dir / "backends" / "python" / "libtriton_python.so",
        install.package_dir / "backends" / "python" / "triton_python_backend_utils.py",
        install.stub,
    )
    for source in sources:
        if not source.exists():
            source = install.package_dir / source.name  # older wheels keep them at the package root
        shutil.copy2(source, target / source.name)
    return Path(backends_dir)


def triton_environment(install: TritonInstall, base: dict[str, str] | None = None) -> dict[str, str]:
    """The variables tritonserver and its Python backend stub need (see the module docstring)."""
    env = dict(os.environ if base is None else base)

    def prepend(name: str, *paths: Path) -> str:
        parts = [str(p) for p in paths] + [p for p in env.get(name, "").split(os.pathsep) if p]
        return os.pathsep.join(dict.fromkeys(parts))

    env["LD_LIBRARY_PATH"] = prepend("LD_LIBRARY_PATH", install.libdir, install.bundled_libs)
    env["PYTHONPATH"] = str(install.site_packages)  # only the Triton env's packages, never the services'
    env["PATH"] = prepend("PATH", install.venv / "bin")
    env.pop("PYTHONHOME", None)
    return env


def tritonserver_argv(
    install: TritonInstall,
    repository: Path,
    backends_dir: Path,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    model_control: str = "explicit",
    repository_poll_secs: int = 15,
) -> list[str]:
    """``explicit`` (the local stack: one server, models loaded and unloaded through the API as registry
    aliases move) or ``poll`` (as a cluster's shared Triton runs: it loads what the repository holds)."""
    if model_control not in ("explicit", "poll"):
        raise StackError(f"model control {model_control!r}: explicit or poll")
    polling = [f"--repository-poll-secs={repository_poll_secs}"] if model_control == "poll" else []
    return [
        str(install.tritonserver),
        f"--model-repository={repository}",
        f"--backend-directory={backends_dir}",
        f"--model-control-mode={model_control}",
        *polling,
        "--strict-readiness=false",  # "ready" = the server is up; models are loaded on demand
        "--http-address=127.0.0.1",
        f"--http-port={http_port}",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={grpc_port}",
        "--metrics-address=127.0.0.1",
        f"--metrics-port={metrics_port}",
        "--allow-metrics=true",
        "--exit-timeout-secs=5",
        "--log-info=false",
    ]


def main(argv: list[str] | None = None) -> None:
    """Launcher used by the local stack: resolve the Triton environment at start time, then exec the server.

    Resolving here rather than when the stack is constructed keeps ``Stack()`` cheap and lets a machine
    without .venv-triton use every other component; the exec keeps one pid for the stack's pidfile.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m shared.stack.triton")
    parser.add_argument("--venv", required=True)
    parser.add_argument("--repository", required=True)
    parser.add_argument("--backends-dir", required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--model-control", choices=("explicit", "poll"), default="explicit")
    parser.add_argument("--repository-poll-secs", type=int, default=15)
    args = parser.parse_args(argv)
    try:
        install = find_triton_install(Path(args.venv).resolve())
        backends = prepare_backend_dir(install, Path(args.backends_dir))
    except StackError as exc:
        print(f"triton: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from exc
    repository = Path(args.repository)
    repository.mkdir(parents=True, exist_ok=True)
    command = tritonserver_argv(
        install,
        repository,
        backends,
        args.http_port,
        args.grpc_port,
        args.metrics_port,
        model_control=args.model_control,
        repository_poll_secs=args.repository_poll_secs,
    )
    os.execve(command[0], command, triton_environment(install))


if __name__ == "__main__":
    main()
