"""The sample cases the export parity gate runs on, preprocessed with the model's *own* stored spec.

Why the model's spec: the gate must compare PyTorch and the export on what the service will feed them
(oriented, resampled, normalised, padded volumes), not on raw images, and there is exactly one definition
of that preprocessing — the one logged with the model. Two sources:

* an MSD-format folder (``dataset.json``, ``imagesTr/``): the first ``limit`` images go through
  ``build_transforms(spec, "inference")``;
* a dataset version (``ds-…``): its held-out test cases, already preprocessed in the cache
  (``preprocessed/{hash}/{case}.pt``), accepted only when the version was built with the same spec hash.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from shared.storage import ObjectStore


class ParityCasesError(ValueError):
    """The parity cases cannot be read (missing folder, unknown dataset version, another preprocessing)."""


def is_dataset_version(source: str) -> bool:
    return source.startswith("ds-") and "/" not in source


def cases_from_msd(folder: str | Path, spec: Any, limit: int) -> list[np.ndarray]:
    """The first ``limit`` images of an MSD folder as ``(C, X, Y, Z)`` float32, preprocessed by ``spec``."""
    from shared.datasets.msd import MsdFormatError, read_msd_index
    from shared.preprocessing import build_transforms

    try:
        index = read_msd_index(Path(folder))
    except (MsdFormatError, OSError) as exc:
        raise ParityCasesError(f"{folder}: not a readable MSD folder ({exc})") from exc
    transforms = build_transforms(spec, "inference")
    cases = []
    for image, _label in index.pairs[:limit]:
        volume = transforms({"image": str(image)})["image"]
        cases.append(np.asarray(volume.detach().cpu().numpy(), np.float32))
    if not cases:
        raise ParityCasesError(f"{folder}: no images")
    return cases


def cases_from_dataset_version(
    store: ObjectStore, version_id: str, spec: Any, limit: int, parts: tuple[str, ...] = ("test", "val", "train")
) -> list[np.ndarray]:
    """Cases of a dataset version from the case cache: held-out test ones first (then validation, then
    training) by default; ``parts=("train",)`` for INT8 calibration, which must not see the gate's cases."""
    from shared.datasets import CacheError, ManifestError, cache_key, load_cached, load_manifest

    try:
        manifest = load_manifest(store, version_id)
    except (ManifestError, KeyError) as exc:
        raise ParityCasesError(f"dataset version {version_id}: {exc}") from exc
    if manifest.preprocessing_hash != spec.hash:
        raise ParityCasesError(
            f"dataset version {version_id} was preprocessed with {manifest.preprocessing_hash[:12]}…, the model "
            f"with {spec.hash[:12]}…: its cached cases are not what the model sees; give an MSD folder instead"
        )
    records = []
    for part in parts:
        records += [r for r in manifest.select("holdout", part) if r not in records]
        if len(records) >= limit:
            break
    cases = []
    for record in records[:limit]:
        try:
            cached = load_cached(store, cache_key(manifest.preprocessing_hash, record.case_hash))
        except CacheError as exc:
            raise ParityCasesError(str(exc)) from exc
        cases.append(np.asarray(cached["image"].numpy(), np.float32))
    if not cases:
        raise ParityCasesError(f"dataset version {version_id} has no cases")
    return cases


def load_parity_cases(
    source: str,
    spec: Any,
    store: ObjectStore | None,
    limit: int = 3,
    parts: tuple[str, ...] = ("test", "val", "train"),
) -> list[np.ndarray]:
    """Cases from an MSD folder path or a dataset version id (``ds-…``, needs ``store``; ``parts``: splits)."""
    if limit < 1:
        raise ParityCasesError("the parity gate needs at least one case")
    if is_dataset_version(source):
        if store is None:
            raise ParityCasesError("a dataset version needs object storage (VOXELFLOW_STORAGE_URL)")
        return cases_from_dataset_version(store, source, spec, limit, parts)
    return cases_from_msd(source, spec, limit)
