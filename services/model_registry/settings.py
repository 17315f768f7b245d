"""Configuration of the model-registry service (environment variables ``VOXELFLOW_*``)."""

from __future__ import annotations

from pydantic import Field

from shared.settings import VoxelflowSettings


class ModelRegistrySettings(VoxelflowSettings):
    mlflow_tracking_uri: str = Field(
        default="http://127.0.0.1:5000",
        description="MLflow tracking and model-registry server (the local stack writes it into stack.env).",
    )
    mlflow_ui_url: str | None = Field(
        default=None,
        description="Where people open the MLflow UI, if not the tracking URI (e.g. behind an ingress); "
        "returned in version details as a link.",
    )
    promotion_min_dice: float = Field(
        default=0.8, ge=0, le=1, description="Promotion gate: lowest mean held-out Dice a champion may have."
    )
    promotion_alpha: float = Field(
        default=0.05,
        gt=0,
        lt=1,
        description="Promotion gate: significance level of the one-sided paired Wilcoxon test against the champion.",
    )
    promotion_min_cases: int = Field(
        default=5, ge=1, description="Promotion gate: fewest paired test cases needed to compare with the champion."
    )
    promotion_margin: float = Field(
        default=0.0, ge=0, lt=1, description="Promotion gate: non-inferiority margin in Dice (0 = plain 'not worse')."
    )
    promotion_max_robustness_drop: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Promotion gate: how much larger a candidate's robustness_mean_drop (Dice lost under synthetic "
        "corruptions, `voxelflow evaluate --robustness`) may be than the champion's; a candidate without one is "
        "refused. Unset = robustness is not checked.",
    )
