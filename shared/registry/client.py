"""Opening the registry by URI, and the module-level functions older callers use (thin wrappers).

:func:`open_registry` picks the implementation by scheme, as ``shared.storage.open_object_store`` does:

* ``http://`` / ``https://`` — an MLflow tracking server (the platform's registry);
* ``sqlite:///path/mlflow.db`` — MLflow on a local SQLite store (artifacts beside the database);
* ``file:///dir`` — the same local MLflow store kept in ``dir`` (``dir/mlflow.db``, ``dir/mlartifacts``),
  for a single machine without a server.

The module functions (``register_model_version``, ``load_model``, …) take ``client=``: a
:class:`ModelRegistry`, an ``MlflowClient`` (wrapped), or None (the configured registry). New code
should hold a :class:`ModelRegistry` and call its methods.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from shared.registry import lineage
from shared.registry.base import (
    LoadedModel,
    MetricPoint,
    ModelRegistry,
    NetworkBuilder,
    RegisteredVersion,
    RegistryError,
    git_sha,
    parse_model_uri,
    run_id_of,
)

if TYPE_CHECKING:
    import torch
    from mlflow import MlflowClient

__all__ = [
    "LoadedModel",
    "MetricPoint",
    "RegisteredVersion",
    "RegistryError",
    "attach_artifact",
    "get_version_by_alias",
    "git_sha",
    "load_model",
    "log_training_run",
    "open_registry",
    "parse_model_uri",
    "per_case_dice",
    "register_evaluated_version",
    "register_model_version",
    "registry_client",
    "registry_uri",
    "resolve_version",
    "run_id_of",
    "set_alias",
]

RegistryLike = Any  # ModelRegistry | MlflowClient | None


def registry_uri(uri: str | None = None) -> str:
    """The argument, else ``VOXELFLOW_MLFLOW_TRACKING_URI``, else ``MLFLOW_TRACKING_URI``."""
    resolved = uri or os.environ.get("VOXELFLOW_MLFLOW_TRACKING_URI") or os.environ.get("MLFLOW_TRACKING_URI")
    if not resolved:
        raise RegistryError("no model registry: set VOXELFLOW_MLFLOW_TRACKING_URI")
    return resolved


def open_registry(uri: str | None = None) -> ModelRegistry:
    """The registry at ``uri`` (default: the configured one); ValueError for an unsupported scheme."""
    from shared.registry.mlflow_registry import MlflowRegistry

    resolved = registry_uri(uri)
    parts = urlsplit(resolved)
    if parts.scheme in ("http", "https", "sqlite"):
        return MlflowRegistry(resolved)
    if parts.scheme == "file":
        folder = Path(unquote(parts.path))
        folder.mkdir(parents=True, exist_ok=True)
        return MlflowRegistry(f"sqlite:///{folder / 'mlflow.db'}", artifact_root=(folder / "mlartifacts").as_uri())
    raise ValueError(
        f"unsupported registry URI scheme {parts.scheme!r} in {resolved!r}: use http(s)://, sqlite:// or file://"
    )


def registry_client(tracking_uri: str | None = None) -> MlflowClient:
    """The raw ``MlflowClient`` of an MLflow registry (for MLflow specifics; prefer :func:`open_registry`)."""
    from shared.registry.mlflow_registry import MlflowRegistry

    registry = open_registry(tracking_uri)
    if not isinstance(registry, MlflowRegistry):
        raise RegistryError(f"{registry.uri} is not an MLflow registry")
    return registry.client


def as_registry(client: RegistryLike = None) -> ModelRegistry:
    """``client`` as a :class:`ModelRegistry`: itself, an ``MlflowClient`` wrapped, or the configured one."""
    if client is None:
        return open_registry()
    if isinstance(client, ModelRegistry):
        return client
    from shared.registry.mlflow_registry import MlflowRegistry

    return MlflowRegistry.from_client(client)


def log_training_run(*, client: RegistryLike = None, **kwargs: Any) -> str:
    """:meth:`ModelRegistry.log_training_run` on ``client``."""
    return as_registry(client).log_training_run(**kwargs)


def register_model_version(
    run_id: str,
    model_name: str,
    tags: Mapping[str, str] | None = None,
    *,
    per_case: Sequence[Mapping[str, Any]] | None = None,
    alias: str | None = lineage.CANDIDATE,
    client: RegistryLike = None,
) -> int:
    """:meth:`ModelRegistry.register_version` on ``client``."""
    return as_registry(client).register_version(run_id, model_name, tags, per_case=per_case, alias=alias)


def register_evaluated_version(
    run_id: str,
    model_name: str,
    per_case: Sequence[Mapping[str, Any]] | None,
    tags: Mapping[str, str] | None = None,
    *,
    alias: str | None = lineage.CANDIDATE,
    client: RegistryLike = None,
) -> int:
    """:meth:`ModelRegistry.register_evaluated_version` on ``client``."""
    return as_registry(client).register_evaluated_version(run_id, model_name, per_case, tags, alias=alias)


def set_alias(model_name: str, alias: str, version: int | str, client: RegistryLike = None) -> None:
    as_registry(client).set_alias(model_name, alias, version)


def get_version_by_alias(model_name: str, alias: str, client: RegistryLike = None) -> RegisteredVersion | None:
    return as_registry(client).get_version_by_alias(model_name, alias)


def resolve_version(uri: str, client: RegistryLike = None) -> RegisteredVersion:
    return as_registry(client).resolve(uri)


def per_case_dice(model_version: Any, client: RegistryLike = None) -> dict[str, float] | None:
    return as_registry(client).per_case_dice(model_version)


def attach_artifact(
    model_name: str, version: int | str, local_path: str | Path, artifact_path: str, client: RegistryLike = None
) -> str:
    return as_registry(client).attach_artifact(model_name, version, local_path, artifact_path)


def load_model(
    uri: str,
    client: RegistryLike = None,
    network_builder: NetworkBuilder | None = None,
    map_location: str | torch.device = "cpu",
) -> LoadedModel:
    return as_registry(client).load_model(uri, network_builder, map_location)
