"""The table of voxelflow processes the local stack runs (``services/stack.toml``), read as data.

Why a table and not code: the stack is a library (``shared/``) and must not know the services; the
services declare their own processes (an API under uvicorn, a Celery worker on one queue, a module run
with ``python -m``) in one TOML file, the way the Helm chart declares them as Deployments. The stack fills
in ports and URLs and starts them; nothing here imports a service.
"""

from __future__ import annotations

import os
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

from shared.stack.process import StackError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TABLE = REPO_ROOT / "services" / "stack.toml"
RUN_KINDS = ("api", "worker", "module")
INFRA_NAMES = ("postgres", "redis", "s3", "orthanc", "mlflow", "triton")


@dataclass(frozen=True)
class ProcessSpec:
    """One row of the table, with every placeholder filled in."""

    name: str
    argv: list[str]
    port: int | None
    health_path: str | None
    requires: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    #: the module the row runs (``services.ingest.main:app``): names the image in container mode
    target: str = ""


def table_path() -> Path:
    return Path(os.environ.get("VOXELFLOW_STACK_COMPONENTS", str(DEFAULT_TABLE)))


def load_table(path: Path | None = None) -> list[dict[str, Any]]:
    """The raw rows of the table, checked for the fields every row needs."""
    path = path or table_path()
    try:
        rows = tomllib.loads(path.read_text()).get("component", [])
    except FileNotFoundError:
        raise StackError(
            f"the table of voxelflow processes {path} does not exist (VOXELFLOW_STACK_COMPONENTS)"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise StackError(f"{path} is not valid TOML: {exc}") from None
    for index, row in enumerate(rows, 1):
        missing = [key for key in ("name", "run", "target") if key not in row]
        if missing:
            raise StackError(f"{path}: component #{index} lacks {', '.join(missing)}")
        if row["run"] not in RUN_KINDS:
            raise StackError(f"{path}: component {row['name']!r} has run={row['run']!r}; expected one of {RUN_KINDS}")
        if row["run"] == "worker" and "queue" not in row:
            raise StackError(f"{path}: worker {row['name']!r} names no queue")
        unknown = set(row.get("requires", ())) - set(INFRA_NAMES)
        if unknown:
            raise StackError(f"{path}: component {row['name']!r} requires unknown {sorted(unknown)}")
    return rows


def expand(
    rows: Sequence[Mapping[str, Any]],
    *,
    base_port: int,
    sites: Sequence[str],
    values: Mapping[str, str],
    training_queue: Callable[[str], str],
    backend_server: str | None,
    api_argv: Callable[[str, int], list[str]],
    worker_argv: Callable[..., list[str]],
) -> list[ProcessSpec]:
    """Rows → processes: one per site for ``per_site`` rows, ports from the base port, placeholders filled.

    ``values`` holds the stack-wide placeholders (``state_dir``, ``orthanc_url``, ``inference_backend``);
    ``${url:NAME}`` and ``${port:NAME}`` refer to another row's port, ``${training_queue}`` to the
    site's queue as the contract names it. ``api_argv(app, port)`` and ``worker_argv(module, queue,
    *options)`` build the command lines (the manager's, which the chart mirrors).
    """
    ports: dict[str, int] = {row["name"]: base_port + int(row["port_offset"]) for row in rows if "port_offset" in row}
    refs: dict[str, str] = {}
    for name, number in ports.items():
        refs[f"port:{name}"] = str(number)
        refs[f"url:{name}"] = f"http://127.0.0.1:{number}"

    def fill(text: str, site: str | None) -> str:
        mapping = {**values, **refs}
        if site is not None:
            mapping |= {"site": site, "training_queue": training_queue(site)}
        try:
            return _Placeholders(text).substitute(mapping)
        except (KeyError, ValueError) as exc:
            raise StackError(f"{table_path()}: cannot fill {text!r}: unknown placeholder {exc}") from None

    specs: list[ProcessSpec] = []
    for row in rows:
        row_sites: list[str | None] = list(sites) if row.get("per_site") else [None]
        for site in row_sites:
            port = ports.get(row["name"])
            target = fill(row["target"], site)
            options = [fill(option, site) for option in row.get("options", ())]
            if row["run"] == "api":
                if port is None:
                    raise StackError(f"{table_path()}: API {row['name']!r} has no port_offset")
                argv = [*api_argv(target, port), *options]
            elif row["run"] == "worker":
                argv = worker_argv(target, fill(row["queue"], site), *options)
            else:
                argv = [sys.executable, "-m", target, *options]
            requires = tuple(row.get("requires", ()))
            if row.get("requires_backend_server") and backend_server:
                requires += (backend_server,)
            specs.append(
                ProcessSpec(
                    name=fill(row["name"], site),
                    argv=argv,
                    port=port,
                    health_path=row.get("health"),
                    requires=requires,
                    env={key: fill(str(value), site) for key, value in row.get("env", {}).items()},
                    target=target,
                )
            )
    return specs


def dicom_modalities(rows: Sequence[Mapping[str, Any]], base_port: int) -> dict[str, list[Any]]:
    """The stack's DICOM receivers as Orthanc ``DicomModalities`` (name → [AE title, host, port]).

    Rows with ``dicom_ae`` listen for C-STORE on their port; the local PACS must know them by AE title,
    host and port to answer a C-MOVE with them as the destination (a PACS pull over DIMSE)."""
    return {
        str(row["name"]): [str(row["dicom_ae"]), "127.0.0.1", base_port + int(row["port_offset"])]
        for row in rows
        if "dicom_ae" in row and "port_offset" in row
    }


class _Placeholders(Template):
    """``${url:ingest-api}``: names may hold ``:`` and ``-``."""

    idpattern = r"[a-z_][a-z0-9_:.-]*"
