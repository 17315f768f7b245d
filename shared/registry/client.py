"""MLflow as voxelflow's model registry: logging a training run, registering versions, aliases, loading.

Why no MLflow "flavor": a registered version is a run directory with plain files under ``model/``
(``weights.pt`` state dict, ``training-config.yaml``, ``preprocessing.json``, ``labels.json``), so that
loading never unpickles a class (``torch.load(weights_only=True)``) and the network is rebuilt from its
configuration by ``shared.training.build_network``. Everything goes through one :class:`MlflowClient`
against the tracking server (``VOXELFLOW_MLFLOW_TRACKING_URI``), never MLflow's process-global state.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# MLflow's telemetry thread adds and removes an environment variable while requests copies os.environ on
# every call (a KeyError race seen in tests), and it would phone home from hospital networks: off.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from shared.contracts import artifacts
from shared.contracts.codec import state_from_bytes, state_to_bytes
from shared.registry import lineage

REPO_ROOT = Path(__file__).resolve().parents[2]
NetworkBuilder = Callable[[str, int, int], torch.nn.Module]


class RegistryError(RuntimeError):
    """A registry request that cannot be satisfied (unknown model/version/alias, malformed URI or artifacts)."""


def registry_client(tracking_uri: str | None = None) -> MlflowClient:
    """Client of the tracking/registry server: the argument, else ``VOXELFLOW_MLFLOW_TRACKING_URI``/``MLFLOW_…``."""
    uri = tracking_uri or os.environ.get("VOXELFLOW_MLFLOW_TRACKING_URI") or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise RegistryError("no MLflow tracking server: set VOXELFLOW_MLFLOW_TRACKING_URI")
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def git_sha() -> str:
    """The code version: ``VOXELFLOW_GIT_SHA`` (set in images, which have no .git), else ``git rev-parse HEAD``."""
    if os.environ.get("VOXELFLOW_GIT_SHA"):
        return os.environ["VOXELFLOW_GIT_SHA"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


# ------------------------------------------------------------------------------------------- logging a run


@dataclass(frozen=True)
class MetricPoint:
    """One value of a curve: ``key`` at ``step`` (epoch or federated round), optionally of one ``site``.

    Site metrics are logged as ``site/{site}/{key}`` so the MLflow UI groups them; global ones as ``key``.
    """

    key: str
    value: float
    step: int
    site: str | None = None

    @property
    def mlflow_key(self) -> str:
        return f"site/{self.site}/{self.key}" if self.site else self.key


def plot_curves(points: Sequence[MetricPoint]) -> dict[str, Any]:
    """One matplotlib figure per metric key (a line per site and one for the global value)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    by_key: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for point in points:
        by_key.setdefault(point.key, {}).setdefault(point.site or "global", []).append((point.step, point.value))
    figures = {}
    for key, series in by_key.items():
        figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
        for name, values in sorted(series.items()):
            steps, ys = zip(*sorted(values), strict=True)
            axes.plot(steps, ys, marker="o", label=name)
        axes.set_xlabel("step (epoch / round)")
        axes.set_ylabel(key)
        axes.set_title(key)
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        figures[key] = figure
    return figures


def _ensure_experiment(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    try:
        return str(client.create_experiment(name))
    except MlflowException:  # created concurrently by another process
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return str(experiment.experiment_id)


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:6000]
    return flat


def log_training_run(
    *,
    experiment: str,
    state_dict: Mapping[str, torch.Tensor],
    training_config_yaml: str,
    preprocessing_spec: Mapping[str, Any],
    preprocessing_hash: str,
    labels: Mapping[int, str],
    dataset_version: str,
    params: Mapping[str, Any] | None = None,
    metrics: Iterable[MetricPoint] = (),
    tags: Mapping[str, str] | None = None,
    run_name: str | None = None,
    client: MlflowClient | None = None,
) -> str:
    """Log a finished training as one MLflow run and return its ``run_id``.

    The run holds what reproduces and explains the model: ``params`` (nested dicts are flattened to
    ``a.b``), every metric point with its step, the lineage tags (dataset version, preprocessing hash,
    git SHA, plus ``tags``), the ``model/`` artifacts of the contract and one PNG curve per metric key
    under ``plots/``.
    """
    client = client or registry_client()
    points = list(metrics)
    label_map = {int(k): str(v) for k, v in labels.items()}
    if 0 not in label_map or len(label_map) < 2:
        raise ValueError("labels must name background (0) and at least one foreground label")
    run_tags = {
        "dataset_version": dataset_version,
        "preprocessing_hash": preprocessing_hash,
        "git_sha": git_sha(),
        **(tags or {}),
    }
    run = client.create_run(_ensure_experiment(client, experiment), run_name=run_name, tags=run_tags)
    run_id = run.info.run_id
    try:
        all_params = {
            **_flatten(params or {}),
            "dataset_version": dataset_version,
            "preprocessing_hash": preprocessing_hash,
        }
        metric_entities = [Metric(p.mlflow_key, float(p.value), 0, int(p.step)) for p in points]
        param_entities = [Param(k, v) for k, v in all_params.items()]
        for start in range(0, max(len(metric_entities), len(param_entities)), 100):  # MLflow batch limits
            client.log_batch(
                run_id,
                metrics=metric_entities[start : start + 100],
                params=param_entities[start : start + 100],
            )
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = Path(tmp) / lineage.MODEL_DIR
            model_dir.mkdir()
            (model_dir / artifacts.WEIGHTS_FILE).write_bytes(state_to_bytes(state_dict))
            (model_dir / artifacts.TRAINING_CONFIG_FILE).write_text(training_config_yaml)
            (model_dir / artifacts.PREPROCESSING_FILE).write_text(json.dumps(dict(preprocessing_spec), indent=2))
            (model_dir / artifacts.LABELS_FILE).write_text(
                json.dumps({str(k): v for k, v in sorted(label_map.items())})
            )
            client.log_artifacts(run_id, str(model_dir), lineage.MODEL_DIR)
        from matplotlib import pyplot as plt

        for key, figure in plot_curves(points).items():
            client.log_figure(run_id, figure, f"{lineage.PLOTS_DIR}/{key.replace('/', '_')}.png")
            plt.close(figure)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return run_id


# ------------------------------------------------------------------------------------------- versions


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="voxelflow segmentation model")
        except MlflowException:
            client.get_registered_model(name)  # created concurrently: fine if it exists now


def register_model_version(
    run_id: str,
    model_name: str,
    tags: Mapping[str, str] | None = None,
    *,
    per_case: Sequence[Mapping[str, Any]] | None = None,
    alias: str | None = lineage.CANDIDATE,
    client: MlflowClient | None = None,
) -> int:
    """Register the run's ``model/`` as a new version of ``model_name`` and return its number.

    Idempotent (tasks are retried): a run already registered under this name returns that version.
    ``per_case`` are evaluation records on the held-out test set (``case_id``, ``dice``, … per label,
    from :func:`shared.evaluation.case_metrics`); they are logged as ``evaluation/per_case.json`` in the
    run and their mean Dice becomes the ``test_dice`` tag. The version is given ``alias`` (``candidate``).
    """
    client = client or registry_client()
    run = client.get_run(run_id)
    existing = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    if existing:
        version = min(int(v.version) for v in existing)
        if alias:
            client.set_registered_model_alias(model_name, alias, str(version))
        return version
    present = {f.path for f in client.list_artifacts(run_id, lineage.MODEL_DIR)}
    missing = {lineage.WEIGHTS, lineage.TRAINING_CONFIG, lineage.PREPROCESSING, lineage.LABELS} - present
    if missing:
        raise RegistryError(f"run {run_id} lacks {sorted(missing)}: log it with log_training_run first")
    version_tags = {name: run.data.tags.get(name, "") for name in lineage.LINEAGE_TAGS}
    if per_case is not None:
        from shared.evaluation.metrics import mean_dice_per_case

        per_case_dice = mean_dice_per_case(per_case)
        if not per_case_dice:
            raise ValueError("per_case holds no records")
        client.log_dict(
            run_id,
            {"metric": "mean foreground Dice per case", "cases": per_case_dice, "records": _finite(per_case)},
            lineage.PER_CASE,
        )
        test_dice = sum(per_case_dice.values()) / len(per_case_dice)
        version_tags["test_dice"] = f"{test_dice:.6f}"
        client.log_metric(run_id, "test_dice", test_dice)
    version_tags.update(tags or {})
    _ensure_registered_model(client, model_name)
    model_version = client.create_model_version(
        model_name,
        source=f"{run.info.artifact_uri}/{lineage.MODEL_DIR}",
        run_id=run_id,
        tags={k: str(v) for k, v in version_tags.items()},
    )
    if alias:
        client.set_registered_model_alias(model_name, alias, model_version.version)
    return int(model_version.version)


def register_evaluated_version(
    run_id: str,
    model_name: str,
    per_case: Sequence[Mapping[str, Any]] | None,
    tags: Mapping[str, str] | None = None,
    *,
    alias: str | None = lineage.CANDIDATE,
    client: MlflowClient | None = None,
) -> int:
    """Log the held-out test summary to the run and register it: the one path of federated and centralised runs.

    Why one function: a federated version and its centralised baseline are compared by the promotion gate,
    so both must carry the same metrics (``test/dice_mean``, per label ``test/{label}/dice`` with bootstrap
    CI from :func:`shared.evaluation.held_out.held_out_metrics`), the same ``evaluation/per_case.json`` and the
    same ``test_dice`` tag. ``per_case`` None or empty (a dataset without a test split) registers the
    version without them; the gate then refuses to promote it. Idempotent like
    :func:`register_model_version` (metrics are re-logged with the same values at step 0).
    """
    client = client or registry_client()
    if per_case:
        from shared.evaluation.held_out import held_out_metrics

        values = held_out_metrics(per_case)
        client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in sorted(values.items())])
    return register_model_version(
        run_id, model_name, tags, per_case=list(per_case) if per_case else None, alias=alias, client=client
    )


def _finite(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """JSON has no NaN: undefined metrics are stored as null."""
    return [{k: (None if isinstance(v, float) and v != v else v) for k, v in record.items()} for record in records]


def run_id_of(model_version: ModelVersion) -> str:
    """The run a version was registered from (every voxelflow version has one)."""
    if not model_version.run_id:
        raise RegistryError(f"models:/{model_version.name}/{model_version.version} has no run")
    return str(model_version.run_id)


def set_alias(model_name: str, alias: str, version: int | str, client: MlflowClient | None = None) -> None:
    (client or registry_client()).set_registered_model_alias(model_name, alias, str(version))


def get_version_by_alias(model_name: str, alias: str, client: MlflowClient | None = None) -> ModelVersion | None:
    """The version holding ``alias``, or None when no version holds it (e.g. no champion yet)."""
    try:
        return (client or registry_client()).get_model_version_by_alias(model_name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` → (name, None, alias); ``models:/name/7`` → (name, "7", None)."""
    if not uri.startswith("models:/"):
        raise RegistryError(f"not a registry URI: {uri!r} (expected models:/NAME@ALIAS or models:/NAME/VERSION)")
    rest = uri[len("models:/") :].strip("/")
    if "@" in rest:
        name, _, alias = rest.rpartition("@")
        if name and alias and "/" not in name:
            return name, None, alias
    else:
        name, _, version = rest.rpartition("/")
        if name and version.isdigit():
            return name, version, None
    raise RegistryError(f"malformed registry URI {uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")


def resolve_version(uri: str, client: MlflowClient | None = None) -> ModelVersion:
    client = client or registry_client()
    name, version, alias = parse_model_uri(uri)
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise RegistryError(f"{uri}: {exc.message}") from exc


def per_case_dice(model_version: ModelVersion, client: MlflowClient | None = None) -> dict[str, float] | None:
    """The version's ``evaluation/per_case.json`` cases (case_id → mean Dice), or None if it has none."""
    client = client or registry_client()
    if not any(f.path == lineage.PER_CASE for f in client.list_artifacts(run_id_of(model_version), "evaluation")):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id_of(model_version), lineage.PER_CASE, tmp)
        data = json.loads(Path(path).read_text())
    return {str(k): float(v) for k, v in data["cases"].items()}


def attach_artifact(
    model_name: str,
    version: int | str,
    local_path: str | Path,
    artifact_path: str,
    client: MlflowClient | None = None,
) -> str:
    """Add a file or directory to a version's run (exports: ``model/onnx``, ``model/torchscript``); returns
    the artifact path it now has. Why the run: a version's files are its run's ``model/`` directory."""
    client = client or registry_client()
    model_version = client.get_model_version(model_name, str(version))
    local = Path(local_path)
    if not local.exists():
        raise FileNotFoundError(local)
    if local.is_dir():
        client.log_artifacts(run_id_of(model_version), str(local), artifact_path)
        return artifact_path
    client.log_artifact(run_id_of(model_version), str(local), artifact_path)
    return f"{artifact_path}/{local.name}"


# ------------------------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """A registered version rebuilt in memory: the network (eval mode, weights loaded) and what it needs."""

    network: torch.nn.Module
    state_dict: dict[str, torch.Tensor]
    spec: Any  # shared.preprocessing.PreprocessingSpec
    labels: dict[int, str]
    version: ModelVersion
    training_config_yaml: str = ""
    spec_dict: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.version.name)

    @property
    def uri(self) -> str:
        return f"models:/{self.version.name}/{self.version.version}"


def default_network_builder(config_yaml: str, in_channels: int, out_channels: int) -> torch.nn.Module:
    from shared.training import TrainingConfig, build_network

    return build_network(TrainingConfig.from_yaml(config_yaml), in_channels, out_channels)


def _in_channels(config_yaml: str) -> int:
    import yaml

    data = yaml.safe_load(config_yaml) or {}
    return int(data.get("in_channels", 1)) if isinstance(data, dict) else 1


def _parse_spec(spec_dict: dict[str, Any]) -> Any:
    from shared.preprocessing import PreprocessingSpec

    return PreprocessingSpec.from_dict(spec_dict)


def load_model(
    uri: str,
    client: MlflowClient | None = None,
    network_builder: NetworkBuilder | None = None,
    map_location: str | torch.device = "cpu",
) -> LoadedModel:
    """Load ``models:/name@alias`` or ``models:/name/N``: rebuild the network from ``training-config.yaml``
    and load ``weights.pt`` into it (strictly: every key must match). ``network_builder`` defaults to
    ``shared.training.build_network``."""
    client = client or registry_client()
    model_version = resolve_version(uri, client)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(client.download_artifacts(run_id_of(model_version), lineage.MODEL_DIR, tmp))
        except MlflowException as exc:
            raise RegistryError(f"{uri}: cannot download {lineage.MODEL_DIR}/: {exc.message}") from exc
        try:
            state_dict = {
                k: v.to(map_location) if isinstance(v, torch.Tensor) else v
                for k, v in state_from_bytes((local / artifacts.WEIGHTS_FILE).read_bytes()).items()
            }
            config_yaml = (local / artifacts.TRAINING_CONFIG_FILE).read_text()
            spec_dict = json.loads((local / artifacts.PREPROCESSING_FILE).read_text())
            labels = {int(k): str(v) for k, v in json.loads((local / artifacts.LABELS_FILE).read_text()).items()}
        except FileNotFoundError as exc:
            raise RegistryError(f"{uri}: incomplete model artifacts ({exc.filename} missing)") from exc
    network = (network_builder or default_network_builder)(config_yaml, _in_channels(config_yaml), len(labels))
    network.load_state_dict(state_dict, strict=True)
    network.eval()
    return LoadedModel(
        network=network,
        state_dict=state_dict,
        spec=_parse_spec(spec_dict),
        labels=labels,
        version=model_version,
        training_config_yaml=config_yaml,
        spec_dict=spec_dict,
    )
