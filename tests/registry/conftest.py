"""Fixtures for registry tests: the session's real MLflow server, tiny models, a running registry API."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import torch
import yaml
from mlflow import MlflowClient

from shared.registry import MetricPoint, log_training_run, registry_client
from shared.training import TrainingConfig, build_network
from tests.service_harness import serving, tokens_for_every_role

LABELS = {0: "background", 1: "anterior", 2: "posterior"}
# A shared.training config, small enough for 1 CPU thread.
TINY_CONFIG = {
    "network": {"name": "unet", "args": {"channels": [4, 8], "strides": [2], "num_res_units": 0}},
    "num_classes": 3,
    "in_channels": 1,
}
SPEC = {
    "name": "test-mr",
    "modality": "MR",
    "deterministic": [
        {"name": "Orientationd", "args": {"axcodes": "RAS"}},
        {"name": "NormalizeIntensityd", "args": {"nonzero": True}},
    ],
    "augmentation": [],
}


def tiny_network_builder(config_yaml: str, in_channels: int, out_channels: int) -> torch.nn.Module:
    """The network a training config describes, exactly as load_model rebuilds it (shared.training)."""
    return build_network(TrainingConfig.from_yaml(config_yaml), in_channels, out_channels)


@pytest.fixture(scope="session")
def mlflow_client(mlflow_uri: str) -> MlflowClient:
    torch.set_num_threads(1)
    return registry_client(mlflow_uri)


def log_tiny_model(client: MlflowClient, seed: int = 0, experiment: str = "registry-tests", **kwargs: Any) -> str:
    """Log a freshly initialised tiny UNet with curves for two sites; returns the run ID."""
    torch.manual_seed(seed)
    config_yaml = yaml.safe_dump(TINY_CONFIG)
    network = tiny_network_builder(config_yaml, 1, len(LABELS))
    points = [
        MetricPoint("train_loss", 1.5 - 0.1 * r - 0.05 * s, r, site=site)
        for r in range(3)
        for s, site in enumerate(("site-a", "site-b"))
    ] + [MetricPoint("val_dice", 0.2 + 0.1 * r, r) for r in range(3)]
    return log_training_run(
        experiment=experiment,
        state_dict=network.state_dict(),
        training_config_yaml=config_yaml,
        preprocessing_spec=SPEC,
        preprocessing_hash="a" * 64,
        labels=LABELS,
        dataset_version="ds-0123456789abcdef",
        params={"optimizer": {"name": "adamw", "lr": 0.002}, "rounds": 3},
        metrics=points,
        tags={"federated_run_id": "fed-test", "strategy": "fedavg"},
        client=client,
        **kwargs,
    )


def per_case_records(dice_by_case: dict[str, float]) -> list[dict[str, Any]]:
    """Evaluation records (two labels per case) whose per-case mean Dice is the given value."""
    return [
        {"case_id": case, "label": label, "label_name": LABELS[label], "dice": dice}
        for case, dice in dice_by_case.items()
        for label in (1, 2)
    ]


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# --- the model-registry API on the session's PostgreSQL and MLflow ---------------------------------


@dataclass
class RegistryService:
    url: str
    tokens: dict[str, str]

    def client(self, role: str | None = "researcher") -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


@pytest.fixture(scope="session")
def registry_service(postgres_url: str, mlflow_uri: str) -> Iterator[RegistryService]:
    from services.model_registry.main import create_app
    from services.model_registry.settings import ModelRegistrySettings

    settings = ModelRegistrySettings(
        database_url=postgres_url,
        mlflow_tracking_uri=mlflow_uri,
        log_json=False,
        promotion_min_dice=0.7,
        promotion_alpha=0.05,
        promotion_min_cases=5,
    )
    app = create_app(settings)
    with serving(app, "model-registry") as url:
        yield RegistryService(url, tokens_for_every_role(app.state.ctx.session_factory, "registry-test"))
