"""Dataset versions: an immutable, content-addressed list of cases, their sites, splits and preprocessing.

``version_id`` is ``ds-`` + the first 16 hex digits of the sha256 over the canonical JSON of the cases
(sorted by id, each with its site), the splits (each part sorted) and the preprocessing hash. The same
content always gets the same id, so a version is reproducible and can never be silently edited:
:func:`save_manifest` refuses a different manifest under an existing id.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared.preprocessing.spec import canonical_json
from shared.storage import ObjectNotFoundError, ObjectStore
from shared.validation import DATASET_VERSION_PATTERN

__all__ = [
    "PARTS",
    "CaseRecord",
    "DatasetManifest",
    "ManifestConflictError",
    "ManifestError",
    "case_file_key",
    "compute_case_hash",
    "compute_version_id",
    "load_manifest",
    "manifest_key",
    "save_manifest",
]

PARTS = ("train", "val", "test")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_VERSION = re.compile(DATASET_VERSION_PATTERN)


class ManifestError(ValueError):
    """A manifest that is malformed or inconsistent (the message says which field and why)."""


class ManifestConflictError(ManifestError):
    """A different manifest already exists under the same version id; versions are immutable."""


def compute_case_hash(image_sha256: str, label_sha256: str | None) -> str:
    """``sha256(image_sha256 + ":" + (label_sha256 or ""))``: identifies a case's content (cache key part)."""
    return hashlib.sha256(f"{image_sha256}:{label_sha256 or ''}".encode()).hexdigest()


def case_file_key(sha256_hex: str) -> str:
    """Content-addressed key of a raw case image or label: ``cases/sha256/{hex}.nii.gz``."""
    return f"cases/sha256/{sha256_hex}.nii.gz"


def manifest_key(version_id: str) -> str:
    return f"datasets/{version_id}/manifest.json"


class CaseRecord(BaseModel):
    """One case of a dataset version: where its raw files are, what their content is, whose site it is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    case_id: str = Field(min_length=1)
    patient: str = Field(min_length=1)
    site: str = Field(min_length=1)
    modality: str = Field(min_length=1)
    image_key: str = Field(min_length=1)
    label_key: str | None = None
    image_sha256: str
    label_sha256: str | None = None
    case_hash: str = ""
    source: str = Field(min_length=1)

    @field_validator("image_sha256", "label_sha256")
    @classmethod
    def _hex(cls, value: str | None) -> str | None:
        if value is not None and not _SHA256.match(value):
            raise ValueError(f"not a lower-case sha256 hex digest: {value!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CaseRecord:
        if (self.label_key is None) != (self.label_sha256 is None):
            raise ValueError(f"case {self.case_id}: label_key and label_sha256 must both be set or both be None")
        expected = compute_case_hash(self.image_sha256, self.label_sha256)
        if not self.case_hash:
            object.__setattr__(self, "case_hash", expected)
        elif self.case_hash != expected:
            raise ValueError(f"case {self.case_id}: case_hash {self.case_hash} does not match its sha256s ({expected})")
        return self


class DatasetManifest(BaseModel):
    """A dataset version (see docs/contracts.md). Build with :meth:`create`; ``version_id`` is derived."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version_id: str = ""
    name: str = Field(min_length=1)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    labels: dict[int, str] = Field(default_factory=dict)
    cases: list[CaseRecord]
    splits: dict[str, dict[Literal["train", "val", "test"], list[str]]] = Field(default_factory=dict)
    preprocessing: dict[str, Any]
    preprocessing_hash: str
    qc: dict[str, Any] = Field(default_factory=lambda: {"excluded": {}})

    @model_validator(mode="after")
    def _normalise_and_check(self) -> DatasetManifest:
        cases = sorted(self.cases, key=lambda c: c.case_id)
        ids = [c.case_id for c in cases]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"duplicate case ids: {duplicates}")
        known = set(ids)
        splits = {name: {part: sorted(m) for part, m in parts.items()} for name, parts in self.splits.items()}
        for name, parts in splits.items():
            seen: set[str] = set()
            for part, members in parts.items():
                unknown = sorted(set(members) - known)
                if unknown:
                    raise ValueError(f"split {name}.{part} names cases not in the manifest: {unknown[:5]}")
                overlap = seen.intersection(members)
                if overlap:
                    raise ValueError(f"split {name}: cases in more than one part: {sorted(overlap)[:5]}")
                seen.update(members)
        stored_hash = self.preprocessing.get("hash")
        if stored_hash is not None and stored_hash != self.preprocessing_hash:
            raise ValueError(f"preprocessing_hash {self.preprocessing_hash} differs from the spec's hash {stored_hash}")
        excluded = set((self.qc or {}).get("excluded", {}))
        if excluded & known:
            raise ValueError(f"cases both included and excluded by QC: {sorted(excluded & known)[:5]}")
        object.__setattr__(self, "cases", cases)
        object.__setattr__(self, "splits", splits)
        expected = compute_version_id(cases, splits, self.preprocessing_hash)
        if not self.version_id:
            object.__setattr__(self, "version_id", expected)
        elif self.version_id != expected:
            raise ValueError(f"version_id {self.version_id} does not match the content ({expected})")
        return self

    @classmethod
    def create(
        cls,
        name: str,
        cases: list[CaseRecord],
        splits: dict[str, dict[str, list[str]]],
        spec: Any,
        labels: dict[int, str] | None = None,
        excluded: dict[str, list[str]] | None = None,
    ) -> DatasetManifest:
        """A new version from cases, splits and a :class:`~shared.preprocessing.PreprocessingSpec`."""
        return cls.model_validate(
            {
                "name": name,
                "labels": labels or {},
                "cases": cases,
                "splits": splits,
                "preprocessing": spec.to_dict(),
                "preprocessing_hash": spec.hash,
                "qc": {"excluded": dict(excluded or {})},
            }
        )

    def case(self, case_id: str) -> CaseRecord:
        for record in self.cases:
            if record.case_id == case_id:
                return record
        raise KeyError(f"case {case_id!r} is not in dataset {self.version_id}")

    def select(self, split: str = "holdout", part: str = "train", site: str | None = None) -> list[CaseRecord]:
        """The cases of one part of a split (``holdout``/``fold-k``/``loso-{site}``), optionally of one site."""
        if split not in self.splits:
            raise KeyError(f"dataset {self.version_id} has no split {split!r}; it has {sorted(self.splits)}")
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        by_id = {c.case_id: c for c in self.cases}
        chosen = [by_id[i] for i in self.splits[split].get(part, [])]  # type: ignore[call-overload]
        return [c for c in chosen if site is None or c.site == site]

    @property
    def sites(self) -> list[str]:
        return sorted({c.site for c in self.cases})

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=1, sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> DatasetManifest:
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise ManifestError(f"invalid dataset manifest: {exc}") from None

    def _identity(self) -> dict[str, Any]:
        """Everything but created_at: what must agree for two saves of one version to be the same manifest."""
        data = self.model_dump(mode="json")
        data.pop("created_at")
        return data


def compute_version_id(cases: list[CaseRecord], splits: dict[str, Any], preprocessing_hash: str) -> str:
    payload = {
        "cases": [c.model_dump(mode="json") for c in sorted(cases, key=lambda c: c.case_id)],
        "splits": {name: {part: sorted(m) for part, m in parts.items()} for name, parts in splits.items()},
        "preprocessing_hash": preprocessing_hash,
    }
    return "ds-" + hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]


def save_manifest(store: ObjectStore, manifest: DatasetManifest) -> DatasetManifest:
    """Write ``datasets/{version_id}/manifest.json`` once.

    Saving the same manifest again is a no-op that returns the stored one (its original ``created_at``);
    a manifest that differs in anything but ``created_at`` raises :class:`ManifestConflictError`.
    """
    key = manifest_key(manifest.version_id)
    try:
        existing = load_manifest(store, manifest.version_id)
    except KeyError:
        existing = None
    if existing is not None:
        if existing._identity() != manifest._identity():
            raise ManifestConflictError(
                f"dataset {manifest.version_id} already exists with different content (name, labels, QC or spec); "
                "versions are immutable"
            )
        return existing
    store.put_bytes(key, manifest.to_json().encode(), content_type="application/json")
    return manifest


def load_manifest(store: ObjectStore, version_id: str) -> DatasetManifest:
    """The stored manifest; KeyError when the version does not exist, ManifestError when it is corrupt."""
    if not _VERSION.match(version_id):
        raise ManifestError(f"not a dataset version id: {version_id!r} (expected ds- and 16 hex digits)")
    try:
        data = store.get_bytes(manifest_key(version_id))
    except ObjectNotFoundError:
        raise KeyError(f"dataset version {version_id} not found") from None
    manifest = DatasetManifest.from_json(data)
    if manifest.version_id != version_id:
        raise ManifestError(f"{manifest_key(version_id)} holds version {manifest.version_id}")
    return manifest
