"""The preprocessing definition: one YAML document that training, the case cache and serving all read.

Only the deterministic part identifies a pipeline: :attr:`PreprocessingSpec.hash` is the sha256 of its
canonical JSON, so changing augmentation never invalidates cached cases, while any change to what
inference will apply gives a new hash (and a new cache prefix, and a new dataset version).
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared.preprocessing.pipeline import SpecError, validate_steps

__all__ = ["SPECS_DIR", "PreprocessingSpec", "StepSpec", "canonical_json", "list_specs", "load_spec"]

SPECS_DIR = Path(__file__).resolve().parent / "specs"


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, UTF-8: the same content always gives the same bytes (and hash)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class StepSpec(BaseModel):
    """One transform: ``{name: Spacingd, args: {pixdim: [1, 1, 1]}}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    args: dict[str, Any] = Field(default_factory=dict)


class PreprocessingSpec(BaseModel):
    """A named, validated preprocessing definition (see docs/preprocessing.md for the YAML format)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    modality: str = Field(min_length=1)
    description: str = ""
    deterministic: list[StepSpec]
    augmentation: list[StepSpec] = Field(default_factory=list)

    @field_validator("modality")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.strip().upper()

    @model_validator(mode="after")
    def _steps_build(self) -> PreprocessingSpec:
        validate_steps(self.deterministic, self.augmentation)
        return self

    @cached_property
    def hash(self) -> str:
        """sha256 hex of the canonical JSON of the deterministic steps (what the cache and inference depend on)."""
        steps = [step.model_dump(mode="json") for step in self.deterministic]
        return hashlib.sha256(canonical_json({"deterministic": steps}).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """What is stored with a dataset version and logged with a model: the whole spec plus its hash."""
        return {**self.model_dump(mode="json"), "hash": self.hash}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessingSpec:
        """Inverse of :meth:`to_dict`; a stored ``hash`` that does not match the steps is an error."""
        data = dict(data)
        stored = data.pop("hash", None)
        spec = _parse(data, "spec dict")
        if stored is not None and stored != spec.hash:
            raise SpecError(f"spec {spec.name!r}: stored hash {stored} does not match its steps ({spec.hash})")
        return spec

    @classmethod
    def from_yaml(cls, text: str, source: str = "<yaml>") -> PreprocessingSpec:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SpecError(f"{source}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise SpecError(f"{source}: a spec is a YAML mapping with name, modality, deterministic, augmentation")
        return _parse(data, source)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _parse(data: dict[str, Any], source: str) -> PreprocessingSpec:
    try:
        return PreprocessingSpec.model_validate(data)
    except ValidationError as exc:
        # pydantic wraps SpecError raised in validators; unwrap so the message stays one clear sentence
        for error in exc.errors():
            ctx_error = (error.get("ctx") or {}).get("error")
            if isinstance(ctx_error, SpecError):
                raise SpecError(f"{source}: {ctx_error}") from None
        raise SpecError(f"{source}: invalid spec: {exc}") from None


def list_specs() -> list[str]:
    """Names of the built-in specs (``shared/preprocessing/specs/*.yaml``)."""
    return sorted(p.stem for p in SPECS_DIR.glob("*.yaml"))


def load_spec(name_or_path: str | Path) -> PreprocessingSpec:
    """A built-in spec by name (``mr_hippocampus``) or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = SPECS_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise SpecError(f"no built-in preprocessing spec {name_or_path!r}; built-in: {', '.join(list_specs())}")
    elif not path.is_file():
        raise SpecError(f"preprocessing spec file not found: {path}")
    return PreprocessingSpec.from_yaml(path.read_text("utf-8"), source=str(path))
