"""MLflow logging of federated runs: parameters, per-round and per-site metrics, curves, the registered model.

Every call is safe to repeat: after a crash the aggregator re-logs a round's metrics at the same step
(same values) and looks a run's model version up by its ``federated_run_id`` tag before registering
another one, so a resumed run never registers twice.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Protocol

from shared.contracts import artifacts as artifact_names

log = logging.getLogger("voxelflow.aggregation.tracking")


class RunTracker(Protocol):
    def start(self, run: Any, params: dict[str, Any], tags: dict[str, str]) -> str | None: ...

    def log_round(self, mlflow_run_id: str | None, round_index: int, metrics: dict[str, float]) -> None: ...

    def finish(
        self,
        mlflow_run_id: str | None,
        federated_run_id: str,
        history: list[dict[str, Any]],
        artifacts: dict[str, bytes],
        version_tags: dict[str, str],
        per_case: list[dict[str, Any]] | None = None,
        extra_metrics: dict[str, float] | None = None,
    ) -> tuple[str | None, str | None]: ...

    def fail(self, mlflow_run_id: str | None, reason: str) -> None: ...


class NullTracker:
    """No tracking server configured: nothing is logged (single-machine trials)."""

    def start(self, run: Any, params: dict[str, Any], tags: dict[str, str]) -> str | None:
        log.warning("no MLflow tracking URI configured: federated run %s is not logged", run.id)
        return None

    def log_round(self, mlflow_run_id: str | None, round_index: int, metrics: dict[str, float]) -> None:
        return None

    def finish(
        self,
        mlflow_run_id: str | None,
        federated_run_id: str,
        history: list[dict[str, Any]],
        artifacts: dict[str, bytes],
        version_tags: dict[str, str],
        per_case: list[dict[str, Any]] | None = None,
        extra_metrics: dict[str, float] | None = None,
    ) -> tuple[str | None, str | None]:
        return None, None

    def fail(self, mlflow_run_id: str | None, reason: str) -> None:
        return None


def curves_png(history: list[dict[str, Any]]) -> bytes:
    """One panel per metric family over rounds (global mean and per site)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({name for entry in history for name in entry["metrics"]})
    fig, axes = plt.subplots(max(1, len(names)), 1, figsize=(7, 2.2 * max(1, len(names))), squeeze=False)
    for axis, name in zip(axes[:, 0], names, strict=False):
        points = [(e["round"], e["metrics"][name]) for e in history if name in e["metrics"]]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("round")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()


class MlflowTracker:
    """A federated run as a registry run (``shared.registry.ModelRegistry``; MLflow behind the URI)."""

    def __init__(self, tracking_uri: str, experiment: str, model_name: str) -> None:
        from shared.registry import open_registry

        self.registry = open_registry(tracking_uri)
        self.experiment = experiment
        self.model_name = model_name

    def start(self, run: Any, params: dict[str, Any], tags: dict[str, str]) -> str | None:
        from shared.registry import flatten_params

        existing = self.registry.find_runs(self.experiment, "federated_run_id", run.id)
        if existing:
            return existing[0]
        mlflow_run_id = self.registry.create_run(
            self.experiment, run_name=run.id, tags={**tags, "federated_run_id": run.id}
        )
        self.registry.log_params(mlflow_run_id, flatten_params(params))
        return mlflow_run_id

    def log_round(self, mlflow_run_id: str | None, round_index: int, metrics: dict[str, float]) -> None:
        if mlflow_run_id is None:
            return
        self.registry.log_metrics(mlflow_run_id, [(k, float(v), round_index) for k, v in sorted(metrics.items())])

    def finish(
        self,
        mlflow_run_id: str | None,
        federated_run_id: str,
        history: list[dict[str, Any]],
        artifacts: dict[str, bytes],
        version_tags: dict[str, str],
        per_case: list[dict[str, Any]] | None = None,
        extra_metrics: dict[str, float] | None = None,
    ) -> tuple[str | None, str | None]:
        """Log the model files and curves, then register through ``register_evaluated_version`` (test
        metrics, ``evaluation/per_case.json``, ``test_dice`` tag, alias ``candidate``): the same path as the
        centralised baseline, so the promotion gate can compare the two. ``extra_metrics`` (the test Dice per
        site, the chosen round) are logged on the run first."""
        if mlflow_run_id is None:
            return None, None
        if extra_metrics:
            self.registry.log_metrics(mlflow_run_id, [(k, float(v), 0) for k, v in sorted(extra_metrics.items())])
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            model_dir = root / artifact_names.MODEL_DIR
            model_dir.mkdir()
            for name, data in artifacts.items():
                (model_dir / name).write_bytes(data)
            self.registry.log_artifacts(mlflow_run_id, model_dir, artifact_names.MODEL_DIR)
            (root / "curves.png").write_bytes(curves_png(history))
            (root / "history.json").write_text(json.dumps(history, indent=1))
            self.registry.log_artifacts(mlflow_run_id, root / "curves.png")
            self.registry.log_artifacts(mlflow_run_id, root / "history.json")
        found = self.registry.find_version_by_tag(self.model_name, "federated_run_id", federated_run_id)
        if found is not None:
            version = found.version
        else:
            version = str(
                self.registry.register_evaluated_version(
                    mlflow_run_id,
                    self.model_name,
                    per_case,
                    {**version_tags, "federated_run_id": federated_run_id},
                )
            )
        self.registry.end_run(mlflow_run_id, "FINISHED")
        return self.model_name, version

    def fail(self, mlflow_run_id: str | None, reason: str) -> None:
        if mlflow_run_id is None:
            return
        self.registry.set_run_tag(mlflow_run_id, "failure_reason", reason[:5000])
        self.registry.end_run(mlflow_run_id, "FAILED")


def make_tracker(tracking_uri: str | None, experiment: str, model_name: str) -> RunTracker:
    if not tracking_uri:
        return NullTracker()
    return MlflowTracker(tracking_uri, experiment, model_name)
