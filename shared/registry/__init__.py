"""The model registry as voxelflow uses it (contract in docs/contracts.md and docs/registry.md).

:class:`ModelRegistry` is the interface (``base.py``); :func:`open_registry` picks its implementation by
URI scheme (MLflow over HTTP(S), or MLflow on a local SQLite/file store). The module-level functions are
thin wrappers kept for existing callers.
"""

from shared.registry.base import (
    LoadedModel,
    MetricPoint,
    ModelRegistry,
    RegisteredModel,
    RegisteredVersion,
    RegistryError,
    RunRecord,
    flatten_params,
    git_sha,
    parse_model_uri,
    run_id_of,
)
from shared.registry.client import (
    as_registry,
    attach_artifact,
    get_version_by_alias,
    load_model,
    log_training_run,
    open_registry,
    per_case_dice,
    register_evaluated_version,
    register_model_version,
    registry_client,
    registry_uri,
    resolve_version,
    set_alias,
)
from shared.registry.lineage import CANDIDATE, CHAMPION, LINEAGE_TAGS, PER_CASE

__all__ = [
    "CANDIDATE",
    "CHAMPION",
    "LINEAGE_TAGS",
    "PER_CASE",
    "LoadedModel",
    "MetricPoint",
    "ModelRegistry",
    "RegisteredModel",
    "RegisteredVersion",
    "RegistryError",
    "RunRecord",
    "as_registry",
    "attach_artifact",
    "flatten_params",
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
