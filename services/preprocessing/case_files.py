"""Case files in object storage: content-addressed keys, the case hash, and the few statistics the service
needs (geometry to check an attached label against, intensity and size for non-IID site assignment).

Content addressing (``cases/sha256/{hex}.nii.gz``) makes import idempotent and free to repeat: the same
bytes are one object however many collections, versions or reruns refer to them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from shared.datasets import case_file_key
from shared.datasets import compute_case_hash as case_hash
from shared.storage import ObjectStore

__all__ = ["CaseFileError", "case_hash", "image_stats", "label_stats", "put_content_addressed", "sha256_file"]

CHUNK = 1024 * 1024


class CaseFileError(ValueError):
    """A file that cannot be a case image or label (unreadable, wrong geometry, non-integer labels)."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def put_content_addressed(store: ObjectStore, path: Path, sha256: str | None = None) -> tuple[str, str]:
    """Upload unless the same bytes are already stored; returns (key, sha256)."""
    sha256 = sha256 or sha256_file(path)
    key = case_file_key(sha256)
    if not store.exists(key):
        store.put_file(key, str(path), "application/gzip")
    return key, sha256


def _load(path: Path, what: str) -> Any:
    try:
        image: Any = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as exc:  # nibabel raises many types for a damaged file
        raise CaseFileError(f"{what} {path.name} is not a readable NIfTI: {exc}") from exc
    if data.ndim not in (3, 4):
        raise CaseFileError(f"{what} {path.name} has {data.ndim} dimensions; a case is 3-D (or 4-D channels)")
    return image, data


def image_stats(path: Path) -> dict[str, Any]:
    """Shape, spacing, affine, physical volume and raw mean intensity of a case image."""
    image, data = _load(path, "image")
    zooms = [float(z) for z in image.header.get_zooms()[:3]]
    if not np.all(np.isfinite(data)):
        raise CaseFileError(f"image {path.name} contains NaN or infinite values")
    return {
        "shape": [int(s) for s in data.shape],
        "spacing_mm": zooms,
        "affine": [[float(v) for v in row] for row in image.affine],
        "volume_mm3": float(np.prod(data.shape[:3]) * np.prod(zooms)),
        "intensity_mean": float(data.mean(dtype=np.float64)),
    }


def label_stats(path: Path, image: dict[str, Any], allowed: set[int] | None = None) -> dict[str, Any]:
    """Check a label against its image (same grid, integer values, known labels) and count its voxels."""
    label, data = _load(path, "label")
    if list(data.shape[:3]) != list(image["shape"][:3]) or data.ndim != 3:
        raise CaseFileError(f"label {path.name} has shape {list(data.shape)}, the image {image['shape'][:3]}")
    if not np.allclose(label.affine, np.asarray(image["affine"]), atol=1e-3):
        raise CaseFileError(f"label {path.name} is not on the image grid (affines differ)")
    if not np.all(np.isfinite(data)) or not np.all(np.equal(np.mod(data, 1), 0)):
        raise CaseFileError(f"label {path.name} has non-integer values")
    values, counts = np.unique(data.astype(np.int64), return_counts=True)
    present = [int(v) for v in values]
    # 0 is background in every label map, named or not (MSD's dataset.json names it; an upload may not).
    if present and (present[0] < 0 or (allowed is not None and not set(present) - {0} <= allowed)):
        raise CaseFileError(f"label {path.name} has values {present}, allowed {sorted(allowed or [])}")
    return {
        "labels_present": [v for v in present if v != 0],
        "label_voxels": {str(v): int(c) for v, c in zip(values, counts, strict=True) if v != 0},
    }
