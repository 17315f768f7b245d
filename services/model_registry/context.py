"""Everything a request handler of the model-registry service needs, built once per process.

The registry keeps no tables of its own: MLflow is the source of truth for models, versions, tags and
aliases; the database holds only the shared API tokens and the audit trail.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from services.model_registry.promotion import GateConfig
from services.model_registry.settings import ModelRegistrySettings
from shared.registry import ModelRegistry, open_registry
from shared.service_context import ServiceContext

SERVICE = "model-registry"


@dataclass
class ModelRegistryContext(ServiceContext):
    settings: ModelRegistrySettings

    @cached_property
    def registry(self) -> ModelRegistry:
        """The registry at ``mlflow_tracking_uri`` (the implementation is chosen by its scheme)."""
        return open_registry(self.settings.mlflow_tracking_uri)

    @property
    def gate(self) -> GateConfig:
        return GateConfig(
            min_dice=self.settings.promotion_min_dice,
            alpha=self.settings.promotion_alpha,
            min_cases=self.settings.promotion_min_cases,
            margin=self.settings.promotion_margin,
            max_robustness_drop=self.settings.promotion_max_robustness_drop,
        )

    @property
    def ui_url(self) -> str:
        return (self.settings.mlflow_ui_url or self.settings.mlflow_tracking_uri).rstrip("/")

    def check_mlflow(self) -> None:
        self.registry.ping()
