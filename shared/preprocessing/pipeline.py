"""Turn a :class:`~shared.preprocessing.spec.PreprocessingSpec` into MONAI ``Compose`` pipelines.

Steps name MONAI dictionary transforms (``Orientationd``, ``Spacingd``, ``NormalizeIntensityd``,
``RandFlipd``, …) or voxelflow's own (``CTWindowd``, ``N4BiasFieldCorrectiond``). The YAML never says
which keys a step applies to: that follows from what the step does, so one definition serves the three
stages without edits:

* intensity transforms (MONAI's ``monai.transforms.intensity`` module and voxelflow's) touch the image only;
* spatial transforms touch image and label; interpolating ones get the configured ``mode`` for the image
  and ``nearest`` for the label, so a label never acquires values between classes;
* except the few MONAI files under spatial that only degrade the image in place
  (:data:`IMAGE_ONLY_SPATIAL`: ``RandSimulateLowResolutiond`` down- and up-samples the image back to its own
  grid, nnU-Net's low-resolution simulation): applied to a label they would blur its classes, while the
  image's geometry, and so the label's, is unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import monai.transforms as mt
from monai.transforms import Compose, InvertibleTransform, MapTransform, Randomizable

from shared.preprocessing import transforms as vf_transforms

if TYPE_CHECKING:
    from shared.preprocessing.spec import PreprocessingSpec, StepSpec

__all__ = ["IMAGE", "LABEL", "STAGES", "SpecError", "build_transforms", "make_inverter", "resolve_step"]

IMAGE = "image"
LABEL = "label"
Stage = Literal["preprocess", "augment", "inference"]
STAGES: tuple[str, ...] = ("preprocess", "augment", "inference")

#: voxelflow's transforms, named in YAML like MONAI's; all of them are intensity transforms.
VOXELFLOW_TRANSFORMS: dict[str, type[MapTransform]] = {
    "CTWindowd": vf_transforms.CTWindowd,
    "N4BiasFieldCorrectiond": vf_transforms.N4BiasFieldCorrectiond,
}
#: Spatial transforms that resample (and so take an interpolation ``mode`` per key).
INTERPOLATING = frozenset(
    {"Spacingd", "Resized", "Rotated", "Zoomd", "Affined", "RandRotated", "RandZoomd", "RandAffined", "Rand3DElasticd"}
)
#: Spatial by MONAI's module, but they leave the grid as it is and only degrade the image: image only.
IMAGE_ONLY_SPATIAL = frozenset({"RandSimulateLowResolutiond"})
#: Added by build_transforms itself, or meaningless in a stored definition.
RESERVED_NAMES = frozenset({"LoadImaged", "EnsureChannelFirstd", "Compose", "Invertd", "SaveImaged"})
RESERVED_ARGS = frozenset({"keys", "allow_missing_keys"})
_DEFAULT_IMAGE_MODE = {"Zoomd": "area", "RandZoomd": "area", "Resized": "area"}


class SpecError(ValueError):
    """A preprocessing definition that cannot be built; the message names the step and what is wrong."""


@dataclass(frozen=True)
class ResolvedStep:
    name: str
    cls: type[MapTransform]
    image_only: bool
    random: bool
    invertible: bool


def resolve_step(name: str) -> ResolvedStep:
    """Find the transform class a step names, and classify it; SpecError for unknown or forbidden names."""
    if name in RESERVED_NAMES:
        raise SpecError(f"step {name!r} is added by build_transforms itself and must not appear in a spec")
    cls: Any = VOXELFLOW_TRANSFORMS.get(name) or getattr(mt, name, None)
    if cls is None or not inspect.isclass(cls):
        raise SpecError(
            f"unknown transform {name!r}: use a MONAI dictionary transform (e.g. Spacingd) or one of "
            f"{', '.join(sorted(VOXELFLOW_TRANSFORMS))}"
        )
    if not issubclass(cls, MapTransform):
        raise SpecError(f"transform {name!r} is not a dictionary transform; use its 'd' variant (e.g. {name}d)")
    image_only = (
        name in VOXELFLOW_TRANSFORMS
        or name in IMAGE_ONLY_SPATIAL
        or cls.__module__.startswith("monai.transforms.intensity")
    )
    return ResolvedStep(
        name=name,
        cls=cls,
        image_only=image_only,
        random=issubclass(cls, Randomizable),
        invertible=issubclass(cls, InvertibleTransform),
    )


def _instantiate(step: StepSpec, keys: tuple[str, ...], where: str) -> MapTransform:
    resolved = resolve_step(step.name)
    clash = RESERVED_ARGS.intersection(step.args)
    if clash:
        raise SpecError(f"{where} {step.name}: argument(s) {sorted(clash)} are set by build_transforms, remove them")
    args = dict(step.args)
    step_keys = (IMAGE,) if resolved.image_only else keys
    if step.name in INTERPOLATING:
        image_mode = args.pop("mode", _DEFAULT_IMAGE_MODE.get(step.name, "bilinear"))
        args["mode"] = tuple(image_mode if k == IMAGE else "nearest" for k in step_keys)
    if step.name == "CropForegroundd":
        args.setdefault("source_key", IMAGE)
    if step.name == "Orientationd":  # MONAI's current default, explicit: silences its deprecation warning
        args.setdefault("labels", (("L", "R"), ("P", "A"), ("I", "S")))
    try:
        inspect.signature(resolved.cls).bind(keys=step_keys, allow_missing_keys=True, **args)
    except TypeError as exc:
        raise SpecError(f"{where} {step.name}: invalid arguments {sorted(step.args)}: {exc}") from None
    try:
        return resolved.cls(keys=step_keys, allow_missing_keys=True, **args)
    except Exception as exc:  # any constructor complaint becomes a clear spec error
        raise SpecError(f"{where} {step.name}: {type(exc).__name__}: {exc}") from None


def validate_steps(deterministic: list[StepSpec], augmentation: list[StepSpec]) -> None:
    """Build every step once (cheap: constructors only) so that a bad spec fails at load time, not mid-training."""
    for index, step in enumerate(deterministic):
        where = f"deterministic[{index}]"
        resolved = resolve_step(step.name)
        if resolved.random:
            raise SpecError(f"{where} {step.name} is random: random transforms belong in 'augmentation'")
        if not resolved.image_only and not resolved.invertible:
            raise SpecError(f"{where} {step.name} is spatial but not invertible: inference could not map masks back")
        _instantiate(step, (IMAGE, LABEL), where)
    for index, step in enumerate(augmentation):
        _instantiate(step, (IMAGE, LABEL), f"augmentation[{index}]")


def build_transforms(spec: PreprocessingSpec, stage: Stage, *, load: bool = True) -> Compose:
    """The MONAI pipeline of one stage.

    * ``"preprocess"``: LoadImaged + EnsureChannelFirstd + the deterministic steps, on ``image`` and
      ``label`` (the label may be absent). This is what the case cache stores.
    * ``"augment"``: the augmentation steps only, for cached tensors at training time.
    * ``"inference"``: LoadImaged + EnsureChannelFirstd + the same deterministic steps, on ``image`` only;
      every spatial step is invertible, so :func:`make_inverter` maps a prediction back to the input grid.

    ``load=False`` leaves out LoadImaged (the caller passes an already loaded MetaTensor, channel first
    or not).
    """
    if stage not in STAGES:
        raise SpecError(f"unknown stage {stage!r}: use one of {', '.join(STAGES)}")
    if stage == "augment":
        return Compose([_instantiate(s, (IMAGE, LABEL), f"augmentation[{i}]") for i, s in enumerate(spec.augmentation)])
    keys = (IMAGE, LABEL) if stage == "preprocess" else (IMAGE,)
    head: list[Callable[..., Any]] = []
    if load:
        head.append(mt.LoadImaged(keys=keys, allow_missing_keys=True, image_only=True, reader="NibabelReader"))
    head.append(mt.EnsureChannelFirstd(keys=keys, allow_missing_keys=True))
    steps = [_instantiate(s, keys, f"deterministic[{i}]") for i, s in enumerate(spec.deterministic)]
    return Compose([*head, *steps])


def make_inverter(inference: Compose, pred_key: str = "pred", *, nearest: bool = True) -> mt.Invertd:
    """An ``Invertd`` that maps ``pred_key`` (on the preprocessed grid) back to the original image grid.

    ``nearest=True`` for label maps (no class blending); ``False`` for probabilities.
    """
    return mt.Invertd(keys=pred_key, transform=inference, orig_keys=IMAGE, nearest_interp=nearest, to_tensor=True)
