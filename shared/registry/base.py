"""The model-registry interface every service codes against (contract: docs/contracts.md, docs/registry.md).

Two layers, as in ``shared.storage``: an implementation provides the *primitives* (experiments, runs,
their params/metrics/tags/artifacts, versions, aliases, version tags), chosen by URI scheme in
:func:`shared.registry.open_registry`; the voxelflow *operations* (log a training run with the
``model/`` files, register a version with its lineage tags and held-out evaluation, resolve a
``models:/`` URI, attach an export, load a model, per-case Dice) are written once here on top of them, so
every implementation behaves the same. One contract suite (tests/registry/test_registry_contract.py) runs
against each implementation.

Why plain files under ``model/`` and no MLflow "flavor": loading never unpickles a class
(``torch.load(weights_only=True)``) and the network is rebuilt from its configuration by
``shared.training.build_network``.
"""

from __future__ import annotations

import abc
import json
import math
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.contracts import artifacts
from shared.registry import lineage

if TYPE_CHECKING:
    import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
NetworkBuilder = Callable[[str, int, int], "torch.nn.Module"]
#: the longest parameter value a registry keeps (MLflow's limit)
MAX_PARAM_LENGTH = 6000


class RegistryError(RuntimeError):
    """A registry request that cannot be satisfied (unknown model/version/alias, malformed URI or artifacts)."""


@dataclass(frozen=True)
class RegisteredVersion:
    """One version of a registered model: where it came from (``run_id``), its tags and aliases."""

    name: str
    version: str
    run_id: str
    tags: dict[str, str] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)
    source: str = ""
    status: str = "READY"
    created_at_ms: int | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class RunRecord:
    """A tracked run: its experiment, status, parameters, latest metric values and tags."""

    run_id: str
    experiment_id: str
    status: str
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RegisteredModel:
    """A registered model: its aliases (alias → version number) and newest version."""

    name: str
    description: str = ""
    aliases: dict[str, int] = field(default_factory=dict)
    latest_version: int | None = None
    updated_at_ms: int | None = None


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


@dataclass
class LoadedModel:
    """A registered version rebuilt in memory: the network (eval mode, weights loaded) and what it needs."""

    network: torch.nn.Module
    state_dict: dict[str, torch.Tensor]
    spec: Any  # shared.preprocessing.PreprocessingSpec
    labels: dict[int, str]
    version: RegisteredVersion
    training_config_yaml: str = ""
    spec_dict: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.version.name)

    @property
    def uri(self) -> str:
        return f"models:/{self.version.name}/{self.version.version}"


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


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested parameters as ``a.b`` keys with string values, each cut to :data:`MAX_PARAM_LENGTH`."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


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


def run_id_of(model_version: Any) -> str:
    """The run a version was registered from (every voxelflow version has one)."""
    if not model_version.run_id:
        raise RegistryError(f"models:/{model_version.name}/{model_version.version} has no run")
    return str(model_version.run_id)


def _finite(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """JSON has no NaN: undefined metrics are stored as null."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in records]


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


class ModelRegistry(abc.ABC):
    """Experiments and runs (tracking) plus registered models, versions and aliases (the registry)."""

    #: the URI this registry was opened with (``open_registry(registry.uri)`` opens the same one)
    uri: str

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise when the registry cannot be reached (a readiness check; cheap)."""

    # ------------------------------------------------------------------------- primitives: tracking

    @abc.abstractmethod
    def ensure_experiment(self, name: str) -> str:
        """The experiment's id, creating it when absent (safe against a concurrent creator)."""

    @abc.abstractmethod
    def create_run(self, experiment: str, run_name: str | None = None, tags: Mapping[str, str] | None = None) -> str:
        """A new running run in ``experiment`` (created when absent); returns its id."""

    @abc.abstractmethod
    def find_runs(self, experiment: str, tag: str, value: str) -> list[str]:
        """Ids of the runs of ``experiment`` whose tag ``tag`` equals ``value`` (none when it does not exist)."""

    @abc.abstractmethod
    def get_run(self, run_id: str) -> RunRecord:
        """The run; RegistryError for an unknown run."""

    def run_tags(self, run_id: str) -> dict[str, str]:
        return self.get_run(run_id).tags

    def run_status(self, run_id: str) -> str:
        """``RUNNING``, ``FINISHED`` or ``FAILED``."""
        return self.get_run(run_id).status

    def run_metrics(self, run_id: str) -> dict[str, float]:
        """The latest value of each metric of the run."""
        return self.get_run(run_id).metrics

    @abc.abstractmethod
    def log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        """Set parameters (strings, at most :data:`MAX_PARAM_LENGTH` long); re-logging a same value is fine."""

    @abc.abstractmethod
    def log_metrics(self, run_id: str, points: Iterable[tuple[str, float, int]]) -> None:
        """Log ``(key, value, step)`` points; a point logged again at the same step is a repeat, not an error."""

    @abc.abstractmethod
    def set_run_tag(self, run_id: str, key: str, value: str) -> None: ...

    @abc.abstractmethod
    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Mark the run ``FINISHED`` or ``FAILED``."""

    @abc.abstractmethod
    def log_artifacts(self, run_id: str, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file (into ``artifact_path``/) or a directory's contents (as ``artifact_path``/)."""

    @abc.abstractmethod
    def list_artifacts(self, run_id: str, path: str | None = None) -> list[str]:
        """Artifact paths directly under ``path`` (files and directories, run-relative, e.g. ``model/labels.json``)."""

    @abc.abstractmethod
    def walk_artifacts(self, run_id: str) -> list[str]:
        """Every artifact file of the run, recursively, sorted (run-relative paths)."""

    @abc.abstractmethod
    def download_artifacts(self, run_id: str, path: str, dest: str | Path) -> Path:
        """Download a file or directory of the run into ``dest``; returns the local path. RegistryError if absent."""

    @abc.abstractmethod
    def run_artifact_uri(self, run_id: str) -> str:
        """Where the run's artifacts live (the source of a version registered from it)."""

    # ------------------------------------------------------------------------- primitives: registry

    @abc.abstractmethod
    def create_version(self, model_name: str, run_id: str, source: str, tags: Mapping[str, str]) -> RegisteredVersion:
        """A new version of ``model_name`` (the registered model is created when absent)."""

    @abc.abstractmethod
    def get_version(self, model_name: str, version: int | str) -> RegisteredVersion:
        """RegistryError when the model or version does not exist."""

    @abc.abstractmethod
    def search_versions(self, model_name: str, run_id: str | None = None) -> list[RegisteredVersion]:
        """Every version of ``model_name`` (of ``run_id`` only, when given); [] for an unknown model."""

    @abc.abstractmethod
    def list_models(self) -> list[RegisteredModel]:
        """The registered models, by name."""

    @abc.abstractmethod
    def get_model(self, model_name: str) -> RegisteredModel:
        """RegistryError for an unknown model."""

    @abc.abstractmethod
    def set_alias(self, model_name: str, alias: str, version: int | str) -> None:
        """Point ``alias`` at ``version`` (moving it from whichever version held it)."""

    @abc.abstractmethod
    def get_version_by_alias(self, model_name: str, alias: str) -> RegisteredVersion | None:
        """The version holding ``alias``, or None when no version holds it (e.g. no champion yet)."""

    def model_aliases(self, model_name: str) -> dict[str, str]:
        """Every alias of ``model_name`` and the version it points at; RegistryError for an unknown model."""
        return {alias: str(version) for alias, version in self.get_model(model_name).aliases.items()}

    @abc.abstractmethod
    def set_version_tag(self, model_name: str, version: int | str, key: str, value: str) -> None: ...

    # ------------------------------------------------------------------------- voxelflow operations

    def log_dict(self, run_id: str, data: Any, artifact_file: str) -> None:
        """``data`` as JSON at ``artifact_file`` of the run."""
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / Path(artifact_file).name
            local.write_text(json.dumps(data, indent=1))
            parent = str(Path(artifact_file).parent)
            self.log_artifacts(run_id, local, None if parent == "." else parent)

    def resolve(self, uri: str) -> RegisteredVersion:
        """The version ``models:/NAME/N`` or ``models:/NAME@ALIAS`` names; RegistryError when there is none."""
        name, version, alias = parse_model_uri(uri)
        if alias is None:
            return self.get_version(name, str(version))
        found = self.get_version_by_alias(name, alias)
        if found is None:
            raise RegistryError(f"{uri}: no version of {name!r} holds alias {alias!r}")
        return found

    def find_version_by_tag(self, model_name: str, tag: str, value: str) -> RegisteredVersion | None:
        """The lowest version of ``model_name`` whose ``tag`` is ``value`` (e.g. a federated run's version)."""
        matches = [v for v in self.search_versions(model_name) if v.tags.get(tag) == value]
        return min(matches, key=lambda v: int(v.version)) if matches else None

    def log_training_run(
        self,
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
    ) -> str:
        """Log a finished training as one run and return its id.

        The run holds what reproduces and explains the model: ``params`` (nested dicts are flattened to
        ``a.b``), every metric point with its step, the lineage tags (dataset version, preprocessing hash,
        git SHA, plus ``tags``), the ``model/`` artifacts of the contract and one PNG curve per metric key
        under ``plots/``.
        """

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
        run_id = self.create_run(experiment, run_name=run_name, tags=run_tags)
        try:
            self.log_params(
                run_id,
                {
                    **flatten_params(params or {}),
                    "dataset_version": dataset_version,
                    "preprocessing_hash": preprocessing_hash,
                },
            )
            self.log_metrics(run_id, [(p.mlflow_key, float(p.value), int(p.step)) for p in points])
            with tempfile.TemporaryDirectory() as tmp:
                model_dir = Path(tmp) / lineage.MODEL_DIR
                model_dir.mkdir()
                from shared.contracts.codec import state_to_bytes

                (model_dir / artifacts.WEIGHTS_FILE).write_bytes(state_to_bytes(state_dict))
                (model_dir / artifacts.TRAINING_CONFIG_FILE).write_text(training_config_yaml)
                (model_dir / artifacts.PREPROCESSING_FILE).write_text(json.dumps(dict(preprocessing_spec), indent=2))
                labels_json = json.dumps({str(k): v for k, v in sorted(label_map.items())})
                (model_dir / artifacts.LABELS_FILE).write_text(labels_json)
                self.log_artifacts(run_id, model_dir, lineage.MODEL_DIR)
                from matplotlib import pyplot as plt

                plots = Path(tmp) / lineage.PLOTS_DIR
                plots.mkdir()
                for key, figure in plot_curves(points).items():
                    figure.savefig(plots / f"{key.replace('/', '_')}.png")
                    plt.close(figure)
                if any(plots.iterdir()):
                    self.log_artifacts(run_id, plots, lineage.PLOTS_DIR)
        except BaseException:
            self.end_run(run_id, "FAILED")
            raise
        self.end_run(run_id, "FINISHED")
        return run_id

    def register_version(
        self,
        run_id: str,
        model_name: str,
        tags: Mapping[str, str] | None = None,
        *,
        per_case: Sequence[Mapping[str, Any]] | None = None,
        alias: str | None = lineage.CANDIDATE,
    ) -> int:
        """Register the run's ``model/`` as a new version of ``model_name`` and return its number.

        Idempotent (tasks are retried): a run already registered under this name returns that version.
        ``per_case`` are evaluation records on the held-out test set (``case_id``, ``dice``, … per label,
        from :func:`shared.evaluation.case_metrics`); they are logged as ``evaluation/per_case.json`` in the
        run and their mean Dice becomes the ``test_dice`` tag. The version is given ``alias`` (``candidate``).
        """
        run_tags = self.run_tags(run_id)
        existing = self.search_versions(model_name, run_id=run_id)
        if existing:
            version = min(int(v.version) for v in existing)
            if alias:
                self.set_alias(model_name, alias, version)
            return version
        present = set(self.list_artifacts(run_id, lineage.MODEL_DIR))
        missing = {lineage.WEIGHTS, lineage.TRAINING_CONFIG, lineage.PREPROCESSING, lineage.LABELS} - present
        if missing:
            raise RegistryError(f"run {run_id} lacks {sorted(missing)}: log it with log_training_run first")
        version_tags = {name: run_tags.get(name, "") for name in lineage.LINEAGE_TAGS}
        if per_case is not None:
            from shared.evaluation.metrics import mean_dice_per_case

            per_case_dice = mean_dice_per_case(per_case)
            if not per_case_dice:
                raise ValueError("per_case holds no records")
            self.log_dict(
                run_id,
                {"metric": "mean foreground Dice per case", "cases": per_case_dice, "records": _finite(per_case)},
                lineage.PER_CASE,
            )
            test_dice = sum(per_case_dice.values()) / len(per_case_dice)
            version_tags["test_dice"] = f"{test_dice:.6f}"
            self.log_metrics(run_id, [("test_dice", test_dice, 0)])
        version_tags.update(tags or {})
        created = self.create_version(
            model_name,
            run_id,
            f"{self.run_artifact_uri(run_id)}/{lineage.MODEL_DIR}",
            {k: str(v) for k, v in version_tags.items()},
        )
        if alias:
            self.set_alias(model_name, alias, created.version)
        return int(created.version)

    def register_evaluated_version(
        self,
        run_id: str,
        model_name: str,
        per_case: Sequence[Mapping[str, Any]] | None,
        tags: Mapping[str, str] | None = None,
        *,
        alias: str | None = lineage.CANDIDATE,
    ) -> int:
        """Log the held-out test summary to the run and register it: the one path of federated and centralised runs.

        Why one function: a federated version and its centralised baseline are compared by the promotion
        gate, so both must carry the same metrics (``test/dice_mean``, per label ``test/{label}/dice`` with
        bootstrap CI from :func:`shared.evaluation.held_out.held_out_metrics`), the same
        ``evaluation/per_case.json`` and the same ``test_dice`` tag. ``per_case`` None or empty (a dataset
        without a test split) registers the version without them; the gate then refuses to promote it.
        Idempotent like :meth:`register_version` (metrics are re-logged with the same values at step 0).
        """
        if per_case:
            from shared.evaluation.held_out import held_out_metrics

            self.log_metrics(run_id, [(k, v, 0) for k, v in sorted(held_out_metrics(per_case).items())])
        return self.register_version(
            run_id, model_name, tags, per_case=list(per_case) if per_case else None, alias=alias
        )

    def per_case_dice(self, model_version: RegisteredVersion) -> dict[str, float] | None:
        """The version's ``evaluation/per_case.json`` cases (case_id → mean Dice), or None if it has none."""
        run_id = run_id_of(model_version)
        if lineage.PER_CASE not in self.list_artifacts(run_id, "evaluation"):
            return None
        with tempfile.TemporaryDirectory() as tmp:
            data = json.loads(self.download_artifacts(run_id, lineage.PER_CASE, tmp).read_text())
        return {str(k): float(v) for k, v in data["cases"].items()}

    def robustness_report(self, model_version: RegisteredVersion) -> dict[str, Any] | None:
        """The version's ``robustness/robustness.json`` (``voxelflow evaluate --robustness``), or None if it has none.

        A file that is not a JSON object comes back as ``{"error": ...}``: the gate then refuses the candidate
        with that reason instead of the API answering 500."""
        run_id = run_id_of(model_version)
        if artifacts.ROBUSTNESS_REPORT not in self.list_artifacts(run_id, artifacts.ROBUSTNESS_DIR):
            return None
        with tempfile.TemporaryDirectory() as tmp:
            try:
                data = json.loads(self.download_artifacts(run_id, artifacts.ROBUSTNESS_REPORT, tmp).read_text())
            except (ValueError, UnicodeDecodeError):
                data = None
        if not isinstance(data, dict):
            return {"error": f"{artifacts.ROBUSTNESS_REPORT} is not a JSON object"}
        return data

    def attach_artifact(self, model_name: str, version: int | str, local_path: str | Path, artifact_path: str) -> str:
        """Add a file or directory to a version's run (exports: ``model/onnx``, ``model/torchscript``); returns
        the artifact path it now has. Why the run: a version's files are its run's ``model/`` directory."""
        run_id = run_id_of(self.get_version(model_name, version))
        local = Path(local_path)
        if not local.exists():
            raise FileNotFoundError(local)
        self.log_artifacts(run_id, local, artifact_path)
        return artifact_path if local.is_dir() else f"{artifact_path}/{local.name}"

    def load_model(
        self,
        uri: str,
        network_builder: NetworkBuilder | None = None,
        map_location: str | torch.device = "cpu",
    ) -> LoadedModel:
        """Load ``models:/name@alias`` or ``models:/name/N``: rebuild the network from ``training-config.yaml``
        and load ``weights.pt`` into it (strictly: every key must match). ``network_builder`` defaults to
        ``shared.training.build_network``."""
        import torch

        from shared.contracts.codec import state_from_bytes

        model_version = self.resolve(uri)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = self.download_artifacts(run_id_of(model_version), lineage.MODEL_DIR, tmp)
            except RegistryError as exc:
                raise RegistryError(f"{uri}: cannot download {lineage.MODEL_DIR}/: {exc}") from exc
            try:
                state_dict = {
                    key: value.to(map_location) if isinstance(value, torch.Tensor) else value
                    for key, value in state_from_bytes((local / artifacts.WEIGHTS_FILE).read_bytes()).items()
                }
                config_yaml = (local / artifacts.TRAINING_CONFIG_FILE).read_text()
                spec_dict = json.loads((local / artifacts.PREPROCESSING_FILE).read_text())
                labels_text = (local / artifacts.LABELS_FILE).read_text()
                labels = {int(k): str(v) for k, v in json.loads(labels_text).items()}
            except FileNotFoundError as exc:
                raise RegistryError(f"{uri}: incomplete model artifacts ({exc.filename} missing)") from exc
        network = (network_builder or _default_network_builder)(config_yaml, _in_channels(config_yaml), len(labels))
        network.load_state_dict(state_dict, strict=True)
        network.eval()
        from shared.preprocessing import PreprocessingSpec

        return LoadedModel(
            network=network,
            state_dict=state_dict,
            spec=PreprocessingSpec.from_dict(spec_dict),
            labels=labels,
            version=model_version,
            training_config_yaml=config_yaml,
            spec_dict=spec_dict,
        )


def _default_network_builder(config_yaml: str, in_channels: int, out_channels: int) -> torch.nn.Module:
    from shared.training import TrainingConfig, build_network

    return build_network(TrainingConfig.from_yaml(config_yaml), in_channels, out_channels)


def _in_channels(config_yaml: str) -> int:
    import yaml

    data = yaml.safe_load(config_yaml) or {}
    return int(data.get("in_channels", 1)) if isinstance(data, dict) else 1
