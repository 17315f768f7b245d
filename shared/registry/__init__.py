"""The MLflow model registry as voxelflow uses it (contract in docs/contracts.md and docs/registry.md)."""

from shared.registry.client import (
    LoadedModel,
    MetricPoint,
    RegistryError,
    attach_artifact,
    get_version_by_alias,
    git_sha,
    load_model,
    log_training_run,
    parse_model_uri,
    per_case_dice,
    register_evaluated_version,
    register_model_version,
    registry_client,
    resolve_version,
    run_id_of,
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
    "RegistryError",
    "attach_artifact",
    "get_version_by_alias",
    "git_sha",
    "load_model",
    "log_training_run",
    "parse_model_uri",
    "per_case_dice",
    "register_evaluated_version",
    "register_model_version",
    "registry_client",
    "resolve_version",
    "run_id_of",
    "set_alias",
]
