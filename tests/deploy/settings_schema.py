"""The chart's ``<service>.settings`` blocks mirror each service's pydantic settings class.

Why generated: the env names a Deployment sets must be fields of the service's ``settings.py``, with the
same types and bounds, or a typo is silently ignored (pydantic-settings ``extra="ignore"``) and a bad value
only fails when the pod starts. :func:`settings_properties` turns a settings class into the JSON-schema
properties of its values block; ``python -m tests.deploy.settings_schema`` writes them into
``values.schema.json`` and tests/deploy/test_settings_env.py fails when the two drift apart.

Left out of the blocks: what the chart itself sets (``CHART_MANAGED``: connection URLs, ports, the site,
queues, the Triton/ingest/PACS endpoints) and credentials (``SecretStr`` fields: Secrets only).
"""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any

from pydantic import SecretStr

from tests.deploy.promql import CHART_DIR

SCHEMA_FILE = CHART_DIR / "values.schema.json"

#: values key -> (settings module, class name); the training worker's block is `trainingWorker.settings`.
SERVICES: dict[str, tuple[str, str]] = {
    "ingest": ("services.ingest.settings", "IngestSettings"),
    "preprocessing": ("services.preprocessing.settings", "PreprocessingSettings"),
    "trainingWorker": ("services.training_worker.settings", "TrainingWorkerSettings"),
    "aggregation": ("services.aggregation.settings", "AggregationSettings"),
    "modelRegistry": ("services.model_registry.settings", "ModelRegistrySettings"),
    "inference": ("services.inference.settings", "InferenceSettings"),
}

#: fields the chart sets from other values (never in a settings block)
CHART_MANAGED = {
    # shared.settings.VoxelflowSettings: URLs composed from Secrets, ConfigMap, metrics port
    "database_url",
    "storage_url",
    "broker_url",
    "log_level",
    "log_json",
    "metrics_port",
    "api_max_request_bytes",
    "api_body_timeout_seconds",
    "project",
    "public_api_docs",
    # per service
    "site",
    "dimse_ae_title",
    "dimse_port",
    "dimse_host",
    "deid_key_file",
    "pacs",
    "preprocessing_queue",
    "backend",
    "triton_url",
    "ingest_url",
    "pacs_url",
    "pacs_username",
    "api_port",
    "mlflow_tracking_uri",
    "aggregation_queue",
    "training_queue_prefix",
}

#: env names a container may carry besides its settings fields: entrypoint and URL-composition variables,
#: the ConfigMap's informational ones, and MLflow's own client variables (shared.registry reads the first)
PLATFORM_ENV = {
    "VOXELFLOW_SERVICE",
    "VOXELFLOW_COMPONENT",
    "VOXELFLOW_POD_NAME",
    "VOXELFLOW_NAMESPACE",
    "VOXELFLOW_DATABASE_USER",
    "VOXELFLOW_DATABASE_PASSWORD",
    "VOXELFLOW_REDIS_PASSWORD",
    "VOXELFLOW_S3_ACCESS_KEY",
    "VOXELFLOW_S3_SECRET_KEY",
    "VOXELFLOW_CELERY_QUEUE",
    "VOXELFLOW_CELERY_POOL",
    "VOXELFLOW_CELERY_CONCURRENCY",
    "VOXELFLOW_MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
}


def settings_class(values_key: str) -> type | None:
    """The settings class of a service, or None while that service is not on this branch yet."""
    module, name = SERVICES[values_key]
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError:
        return None


def settings_properties(cls: type) -> dict[str, Any]:
    """JSON-schema properties for the fields of ``cls`` an operator may set in values (null = service default)."""
    schema = cls.model_json_schema()  # type: ignore[attr-defined]
    out: dict[str, Any] = {}
    for name, field in cls.model_fields.items():  # type: ignore[attr-defined]
        if name in CHART_MANAGED or _is_secret(field.annotation):
            continue
        prop = {k: v for k, v in schema["properties"][name].items() if k not in {"title", "default"}}
        description = prop.pop("description", "")
        if "$ref" in json.dumps(prop):
            continue  # nested models (none today besides the excluded `pacs`)
        alternatives = prop.pop("anyOf", None) or [prop]
        if {"type": "null"} not in alternatives:
            alternatives = [*alternatives, {"type": "null"}]
        out[name] = {"description": description, "anyOf": alternatives}
    return out


def _is_secret(annotation: Any) -> bool:
    return SecretStr in getattr(annotation, "__args__", ()) or annotation is SecretStr


def settings_block_schema(cls: type | None) -> dict[str, Any]:
    if cls is None:  # service not present yet: any VOXELFLOW-style key, checked once it lands
        return {"type": "object", "propertyNames": {"pattern": "^[a-z][a-z0-9_]*$"}}
    return {"type": "object", "additionalProperties": False, "properties": settings_properties(cls)}


def expected_schema_blocks() -> dict[str, dict[str, Any]]:
    return {key: settings_block_schema(settings_class(key)) for key in SERVICES}


def write() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    for key, block in expected_schema_blocks().items():
        schema["properties"][key]["properties"]["settings"] = block
    SCHEMA_FILE.write_text(json.dumps(schema, indent=2) + "\n")


if __name__ == "__main__":
    write()
    sys.stdout.write(f"updated {SCHEMA_FILE}\n")
