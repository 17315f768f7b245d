"""One preprocessing definition for training and serving (see docs/preprocessing.md and docs/contracts.md)."""

from shared.preprocessing.pipeline import IMAGE, LABEL, STAGES, SpecError, build_transforms, make_inverter
from shared.preprocessing.spec import PreprocessingSpec, StepSpec, canonical_json, list_specs, load_spec
from shared.preprocessing.transforms import (
    WINDOW_PRESETS,
    CTWindow,
    CTWindowd,
    N4BiasFieldCorrection,
    N4BiasFieldCorrectiond,
)

__all__ = [
    "IMAGE",
    "LABEL",
    "STAGES",
    "WINDOW_PRESETS",
    "CTWindow",
    "CTWindowd",
    "N4BiasFieldCorrection",
    "N4BiasFieldCorrectiond",
    "PreprocessingSpec",
    "SpecError",
    "StepSpec",
    "build_transforms",
    "canonical_json",
    "list_specs",
    "load_spec",
    "make_inverter",
]
