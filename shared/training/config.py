"""Training configuration: one YAML file describes a local training job, for a federated site or centrally.

The same :class:`TrainingConfig` travels with a federated run (``federated/{run_id}/training-config.yaml``)
and is logged with a registered model, so every field has a default sized for the hippocampus set on a
2-core CPU and every unknown key is an error (a typo must not silently fall back to a default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, model_validator

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

Triple = tuple[PositiveInt, PositiveInt, PositiveInt]


class ConfigError(ValueError):
    """A training configuration that cannot be used (bad YAML, unknown field, impossible combination)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Task = Literal["segmentation", "classification", "detection"]

SEGMENTATION_NETWORKS = ("unet", "dynunet", "segresnet", "swinunetr")
CLASSIFICATION_NETWORKS = ("densenet121", "resnet18")
CLASSIFICATION_LOSSES = ("bce", "ce")


class NetworkConfig(_Strict):
    name: Literal["unet", "dynunet", "segresnet", "swinunetr", "densenet121", "resnet18"] = "unet"
    args: dict[str, Any] = Field(
        default_factory=dict, description="Constructor arguments of the MONAI network, over voxelflow's defaults."
    )


class LossConfig(_Strict):
    name: Literal["dice_ce", "bce", "ce"] = Field(
        default="dice_ce",
        description="dice_ce: segmentation; bce (one logit, binary) or ce (num_classes logits): classification.",
    )
    pos_weight: PositiveFloat | None = Field(
        default=None,
        description="bce only: the weight of positive cases (torch's pos_weight); None = 1. The share of "
        "negatives over positives balances a rare finding.",
    )
    lambda_dice: float = Field(default=1.0, ge=0)
    lambda_ce: float = Field(default=1.0, ge=0)
    include_background: bool = False


class OptimizerConfig(_Strict):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: PositiveFloat = 2e-3
    weight_decay: float = Field(default=1e-5, ge=0)
    momentum: float = Field(default=0.99, ge=0, lt=1, description="SGD only.")
    nesterov: bool = Field(default=True, description="SGD only.")


class ScheduleConfig(_Strict):
    """The learning rate over the whole training (``shared.training.schedule.lr_factor``): a linear warm-up
    of ``warmup_epochs``, then the decay ``name`` over the remaining epochs. In a federated run "the whole
    training" is every round's local epochs together (rounds x local_epochs), not one round."""

    name: Literal["constant", "cosine", "cosine_warm_restarts", "poly"] = "constant"
    warmup_epochs: int = Field(
        default=0, ge=0, description="Linear warm-up epochs before the decay (lr0 * (e+1)/(warmup+1)); 0 = none."
    )
    t_0: PositiveInt = Field(default=10, description="cosine_warm_restarts: epochs until the first restart.")
    t_mult: PositiveInt = Field(default=1, description="cosine_warm_restarts: period growth after each restart.")
    eta_min: float = Field(default=0.0, ge=0, description="cosine, cosine_warm_restarts: lowest learning rate.")
    power: PositiveFloat = Field(default=0.9, description="Poly: lr = lr0 * (1 - epoch/epochs) ** power.")


class PatchConfig(_Strict):
    sampler: Literal["whole", "pos_neg", "uniform"] = Field(
        default="pos_neg",
        description="whole: whole volumes padded to `size` (and to a multiple of `divisible`), no cropping: "
        "the plan's choice when the median case fits a patch; pos_neg: RandCropByPosNegLabeld; "
        "uniform: RandSpatialCropd.",
    )
    size: Triple = (32, 32, 32)
    pos: float = Field(default=1.0, ge=0)
    neg: float = Field(default=1.0, ge=0)
    num_samples: PositiveInt = Field(default=2, description="Patches drawn per volume and iteration.")
    divisible: PositiveInt = Field(default=16, description="Whole volumes are padded to a multiple of this.")


class ValidationConfig(_Strict):
    every: PositiveInt = Field(default=1, description="Validate every N epochs (and after the last).")
    roi_size: Triple = Field(default=(48, 64, 48), description="sliding_window_inference window.")
    sw_batch_size: PositiveInt = 1
    overlap: float = Field(default=0.25, ge=0, lt=1)


class InferenceConfig(_Strict):
    """How the trained model is applied, everywhere it is applied: validation, held-out test and serving.

    Stored with the model (its logged training config), so the inference service and ``voxelflow evaluate``
    run the model exactly as it was scored.
    """

    mirror_axes: tuple[int, ...] = Field(
        default=(),
        description="Test-time mirroring: the softmax is averaged over every combination of flips along "
        "these spatial axes (0, 1, 2), as nnU-Net does; () = off. Costs 2**len(axes) forward passes.",
    )
    largest_component_labels: list[int] | None = Field(
        default=None,
        description="Labels whose prediction keeps only its largest connected component. None: chosen on "
        "the validation cases at the end of training (a label is filtered only where that raises its "
        "validation Dice) and stored with the model.",
    )

    @model_validator(mode="after")
    def _check_axes(self) -> InferenceConfig:
        if any(a not in (0, 1, 2) for a in self.mirror_axes) or len(set(self.mirror_axes)) != len(self.mirror_axes):
            raise ValueError(f"mirror_axes must be distinct spatial axes 0, 1, 2; got {self.mirror_axes}")
        return self


class ClassificationConfig(_Strict):
    """What a classification training needs besides the network (``task: classification``)."""

    input_size: Triple | None = Field(
        default=None,
        description="Volumes are resized (area averaging) to this grid once, before training and inference; "
        "None = as stored. MedMNIST's published 3-D baselines are at 28^3.",
    )
    threshold: Literal["youden", "sensitivity"] = Field(
        default="youden",
        description="How the operating point is chosen on the validation cases after training "
        "(shared.evaluation.classification.choose_threshold).",
    )
    target_sensitivity: float = Field(default=0.9, gt=0, le=1, description="threshold = sensitivity only.")
    augment: bool = Field(
        default=True,
        description="MONAI dictionary augmentation during training: flips on every axis, a small affine "
        "(rotation up to 0.2 rad, scale 10 %), intensity scale and shift (shared.training.classification).",
    )


class EarlyStoppingConfig(_Strict):
    patience: PositiveInt | None = Field(
        default=None, description="Stop after this many validations without a val Dice gain; None = never."
    )
    min_delta: float = Field(default=0.0, ge=0)


class DivergenceConfig(_Strict):
    max_loss: PositiveFloat = Field(
        default=100.0, description="A training loss above this is 'exploding' (DiceCE starts near 1.5 to 2)."
    )


class TrainingConfig(_Strict):
    """Everything :func:`shared.training.local.train_local` needs besides data and starting weights."""

    task: Task = Field(
        default="segmentation",
        description="segmentation (voxel labels), classification (one label per volume) or detection (boxes; "
        "metrics only so far, no training). The default keeps every earlier config valid.",
    )
    network: NetworkConfig = NetworkConfig()
    num_classes: int = Field(default=3, ge=2, description="Output channels including background.")
    in_channels: PositiveInt = 1
    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    epochs: PositiveInt = 2
    batch_size: PositiveInt = 2
    patch: PatchConfig = PatchConfig()
    validation: ValidationConfig = ValidationConfig()
    grad_clip_norm: PositiveFloat | None = Field(default=12.0, description="Max gradient L2 norm; None = off.")
    bf16: bool = Field(default=True, description="bf16 autocast; only ever applied on CUDA devices.")
    seed: int = 0
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    keep: Literal["best", "last"] = Field(
        default="best",
        description="Which weights a training returns: those of the best validation Dice (early stopping "
        "returns the best model, not the last) or the last epoch's. A federated site always delivers its "
        "last local weights; the aggregator keeps the round of the best global validation Dice.",
    )
    inference: InferenceConfig = InferenceConfig()
    classification: ClassificationConfig = ClassificationConfig()
    divergence: DivergenceConfig = DivergenceConfig()
    deep_supervision: int = Field(
        default=0,
        ge=0,
        description="Deep supervision heads below the main output (MONAI DynUNet deep_supr_num; dynunet only); "
        "0 = off. The loss is nnU-Net's: each head's loss against the label downsampled to its size, "
        "weighted 1/2**i and normalised. Evaluation and serving use the main output only (DynUNet returns "
        "only that in eval mode).",
    )

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, data: Any) -> Any:
        """``task: classification`` alone is a working config: its network, loss and class count default to
        the classification ones (DenseNet121, BCE on one logit, 2 classes) instead of the segmentation
        ones, which it could not use."""
        if isinstance(data, dict) and data.get("task") == "classification":
            data = dict(data)
            data.setdefault("network", {"name": "densenet121"})
            data.setdefault("loss", {"name": "bce"})
            data.setdefault("num_classes", 2)
        return data

    @model_validator(mode="after")
    def _check(self) -> TrainingConfig:
        classifying = self.task == "classification"
        if classifying != (self.network.name in CLASSIFICATION_NETWORKS):
            networks = CLASSIFICATION_NETWORKS if classifying else SEGMENTATION_NETWORKS
            raise ValueError(f"task {self.task} needs a network among {networks}, not {self.network.name}")
        if classifying != (self.loss.name in CLASSIFICATION_LOSSES):
            losses = CLASSIFICATION_LOSSES if classifying else ("dice_ce",)
            raise ValueError(f"task {self.task} needs a loss among {losses}, not {self.loss.name}")
        if self.loss.name == "bce" and self.num_classes != 2:
            raise ValueError("loss bce is binary (one logit): num_classes must be 2; use ce for more classes")
        if self.loss.pos_weight is not None and self.loss.name != "bce":
            raise ValueError("loss.pos_weight applies to bce only")
        if self.deep_supervision:
            if self.network.name != "dynunet":
                raise ValueError(f"deep_supervision needs network dynunet, not {self.network.name}")
            if {"deep_supervision", "deep_supr_num"} & set(self.network.args):
                raise ValueError("set deep supervision once: the deep_supervision field, not network.args")
        if self.network.name == "swinunetr":
            # Swin's five patch-merging stages halve the grid five times.
            sizes = [self.validation.roi_size] + ([] if self.patch.sampler == "whole" else [self.patch.size])
            if any(s % 32 for size in sizes for s in size) or (
                self.patch.sampler == "whole" and self.patch.divisible % 32
            ):
                raise ValueError("swinunetr needs patch, window and padding sizes divisible by 32")
        return self

    @classmethod
    def from_yaml(cls, text: str | bytes) -> TrainingConfig:
        """Parse YAML; a malformed file or an invalid field raises ValueError naming what is wrong."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"training configuration is not valid YAML: {exc}") from exc
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"training configuration must be a mapping, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"invalid training configuration: {exc}") from exc

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_config(name_or_path: str | Path) -> TrainingConfig:
    """A bundled config by name (``hippocampus_unet``) or a YAML file by path."""
    path = Path(name_or_path)
    if not path.exists():
        bundled = CONFIG_DIR / f"{name_or_path}.yaml"
        if not bundled.exists():
            names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
            raise FileNotFoundError(f"no training config {name_or_path!r}: not a file, nor one of {names}")
        path = bundled
    return TrainingConfig.from_yaml(path.read_text("utf-8"))
