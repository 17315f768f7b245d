"""The registry on MLflow: a tracking server over HTTP(S), or a local SQLite store for a single machine.

Everything goes through one :class:`MlflowClient` (tracking and registry at the same URI), never MLflow's
process-global state. With a SQLite store there is no server to hold artifacts, so they go to a folder
next to the database (``artifact_root``, default ``<db dir>/mlartifacts``) rather than MLflow's
``./mlruns`` of the current directory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# MLflow's telemetry thread adds and removes an environment variable while requests copies os.environ on
# every call (a KeyError race seen in tests), and it would phone home from hospital networks: off.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from shared.registry.base import (
    MAX_PARAM_LENGTH,
    ModelRegistry,
    RegisteredModel,
    RegisteredVersion,
    RegistryError,
    RunRecord,
)

#: MLflow's log_batch limits (metrics per call, params per call)
_BATCH = 100


def _missing(exc: MlflowException) -> bool:
    return exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def as_version(model_version: ModelVersion) -> RegisteredVersion:
    return RegisteredVersion(
        name=str(model_version.name),
        version=str(model_version.version),
        run_id=str(model_version.run_id or ""),
        tags={str(k): str(v) for k, v in (model_version.tags or {}).items()},
        aliases=[str(a) for a in (getattr(model_version, "aliases", None) or [])],
        source=str(model_version.source or ""),
        status=str(getattr(model_version, "status", None) or "READY"),
        created_at_ms=getattr(model_version, "creation_timestamp", None),
    )


def as_model(model: Any) -> RegisteredModel:
    return RegisteredModel(
        name=str(model.name),
        description=str(model.description or ""),
        aliases={str(alias): int(v) for alias, v in (model.aliases or {}).items()},
        latest_version=max((int(v.version) for v in model.latest_versions or []), default=None),
        updated_at_ms=model.last_updated_timestamp,
    )


class MlflowRegistry(ModelRegistry):
    """:class:`ModelRegistry` on MLflow (``http(s)://`` tracking server or ``sqlite:///`` local store)."""

    def __init__(self, uri: str, *, artifact_root: str | None = None, client: MlflowClient | None = None) -> None:
        self.uri = uri
        self.client = client or MlflowClient(tracking_uri=uri, registry_uri=uri)
        if artifact_root is None and urlsplit(uri).scheme == "sqlite":
            database = Path(uri.removeprefix("sqlite:///"))
            artifact_root = (database.parent / "mlartifacts").resolve().as_uri()
        self.artifact_root = artifact_root

    @classmethod
    def from_client(cls, client: MlflowClient) -> MlflowRegistry:
        """The registry behind an existing client (callers that still hold an ``MlflowClient``)."""
        return cls(str(client.tracking_uri), client=client)

    def ping(self) -> None:
        self.client.search_registered_models(max_results=1)

    # ------------------------------------------------------------------------- tracking

    def ensure_experiment(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return str(experiment.experiment_id)
        location = f"{self.artifact_root}/{name}" if self.artifact_root else None
        try:
            return str(self.client.create_experiment(name, artifact_location=location))
        except MlflowException:  # created concurrently by another process
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return str(experiment.experiment_id)

    def create_run(self, experiment: str, run_name: str | None = None, tags: Mapping[str, str] | None = None) -> str:
        run = self.client.create_run(self.ensure_experiment(experiment), run_name=run_name, tags=dict(tags or {}))
        return str(run.info.run_id)

    def find_runs(self, experiment: str, tag: str, value: str) -> list[str]:
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            return []
        runs = self.client.search_runs([found.experiment_id], filter_string=f"tags.`{tag}` = '{value}'")
        return [str(r.info.run_id) for r in runs]

    def _run(self, run_id: str) -> Any:
        try:
            return self.client.get_run(run_id)
        except MlflowException as exc:
            raise RegistryError(f"run {run_id}: {exc.message}") from exc

    def get_run(self, run_id: str) -> RunRecord:
        run = self._run(run_id)
        return RunRecord(
            run_id=str(run.info.run_id),
            experiment_id=str(run.info.experiment_id),
            status=str(run.info.status),
            params={str(k): str(v) for k, v in run.data.params.items()},
            metrics={str(k): float(v) for k, v in run.data.metrics.items()},
            tags={str(k): str(v) for k, v in run.data.tags.items()},
        )

    def log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        entities = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for start in range(0, len(entities), _BATCH):
            self.client.log_batch(run_id, params=entities[start : start + _BATCH])

    def log_metrics(self, run_id: str, points: Iterable[tuple[str, float, int]]) -> None:
        now = int(time.time() * 1000)
        entities = [Metric(k, float(v), now, int(step)) for k, v, step in points]
        for start in range(0, len(entities), _BATCH):
            self.client.log_batch(run_id, metrics=entities[start : start + _BATCH])

    def set_run_tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, value)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def log_artifacts(self, run_id: str, local_path: str | Path, artifact_path: str | None = None) -> None:
        local = Path(local_path)
        if local.is_dir():
            self.client.log_artifacts(run_id, str(local), artifact_path)
        else:
            self.client.log_artifact(run_id, str(local), artifact_path)

    def list_artifacts(self, run_id: str, path: str | None = None) -> list[str]:
        return [str(f.path) for f in self.client.list_artifacts(run_id, path)]

    def walk_artifacts(self, run_id: str) -> list[str]:
        files: list[str] = []
        pending: list[str | None] = [None]
        while pending:  # a run's tree is small: model/, plots/, evaluation/
            for info in self.client.list_artifacts(run_id, pending.pop()):
                (pending.append(info.path) if info.is_dir else files.append(str(info.path)))
        return sorted(files)

    def download_artifacts(self, run_id: str, path: str, dest: str | Path) -> Path:
        try:
            return Path(self.client.download_artifacts(run_id, path, str(dest)))
        except (MlflowException, OSError) as exc:
            raise RegistryError(f"run {run_id}: cannot download {path}: {exc}") from exc

    def run_artifact_uri(self, run_id: str) -> str:
        return str(self._run(run_id).info.artifact_uri)

    # ------------------------------------------------------------------------- registry

    def create_version(self, model_name: str, run_id: str, source: str, tags: Mapping[str, str]) -> RegisteredVersion:
        try:
            self.client.get_registered_model(model_name)
        except MlflowException:
            try:
                self.client.create_registered_model(model_name, description="voxelflow segmentation model")
            except MlflowException:
                self.client.get_registered_model(model_name)  # created concurrently: fine if it exists now
        created = self.client.create_model_version(model_name, source=source, run_id=run_id, tags=dict(tags))
        return as_version(created)

    def get_version(self, model_name: str, version: int | str) -> RegisteredVersion:
        try:
            return as_version(self.client.get_model_version(model_name, str(version)))
        except MlflowException as exc:
            raise RegistryError(f"models:/{model_name}/{version}: {exc.message}") from exc

    def search_versions(self, model_name: str, run_id: str | None = None) -> list[RegisteredVersion]:
        query = f"name = '{model_name}'" + (f" and run_id = '{run_id}'" if run_id else "")
        try:
            found = self.client.search_model_versions(query, max_results=10000)
        except MlflowException as exc:
            if _missing(exc):
                return []
            raise
        return sorted((as_version(v) for v in found), key=lambda v: int(v.version))

    def list_models(self) -> list[RegisteredModel]:
        found = self.client.search_registered_models(max_results=1000)
        return sorted((as_model(m) for m in found), key=lambda m: m.name)

    def get_model(self, model_name: str) -> RegisteredModel:
        try:
            return as_model(self.client.get_registered_model(model_name))
        except MlflowException as exc:
            raise RegistryError(f"registered model {model_name!r}: {exc.message}") from exc

    def set_alias(self, model_name: str, alias: str, version: int | str) -> None:
        try:
            self.client.set_registered_model_alias(model_name, alias, str(version))
        except MlflowException as exc:
            raise RegistryError(f"models:/{model_name}/{version}: cannot set alias {alias!r}: {exc.message}") from exc

    def get_version_by_alias(self, model_name: str, alias: str) -> RegisteredVersion | None:
        try:
            return as_version(self.client.get_model_version_by_alias(model_name, alias))
        except MlflowException as exc:
            if _missing(exc):
                return None
            raise

    def set_version_tag(self, model_name: str, version: int | str, key: str, value: str) -> None:
        self.client.set_model_version_tag(model_name, str(version), key, value)
