"""A dataset's fingerprint: what an nnU-Net-style planner needs to know about its cases (issue 11; the
planner that turns it into target spacing, patch, topology and normalisation is ``shared.training.plans``).

Per case: voxel spacing (mm) and shape. Per modality (image channel): intensity statistics over the
foreground voxels of every case pooled (as nnU-Net does, so CT clipping follows the tissue, not the air).
Per label: its share of all voxels, and the median size over the cases that contain it, in voxels and mL.

The statistics are pure functions of arrays (:func:`case_fingerprint`, :func:`combine`); only
:func:`fingerprint_msd_folder` (an MSD folder) and :func:`fingerprint_stored_cases` (a dataset version's
raw case files in object storage) read files. The result is a pydantic model saved as JSON; a dataset
version's is stored at :func:`shared.contracts.layout.fingerprint_key` (:func:`save_version_fingerprint`,
:func:`load_version_fingerprint`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from shared.contracts.layout import fingerprint_key
from shared.datasets.msd import MODALITY_CODES, MsdFormatError, read_msd_index
from shared.storage import ObjectNotFoundError, ObjectStore

Spacing = tuple[float, float, float]
Shape = tuple[int, int, int]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IntensityStats(_Frozen):
    """Foreground intensities of one modality, all cases pooled."""

    mean: float
    std: float
    median: float
    p00_5: float = Field(description="0.5th percentile")
    p99_5: float = Field(description="99.5th percentile")
    min: float
    max: float
    voxels: int = Field(description="Foreground voxels the statistics were computed over.")


class LabelStats(_Frozen):
    name: str
    foreground_share: float = Field(description="Voxels of this label / all voxels of all cases.")
    median_voxels: float = Field(description="Median voxel count over the cases that contain the label.")
    median_ml: float = Field(description="Median volume (mL) over the cases that contain the label.")
    cases_present: int


class CaseFingerprint(_Frozen):
    """One case's contribution; ``foreground`` holds its foreground intensities per channel (not saved)."""

    spacing: Spacing
    shape: Shape
    label_voxels: dict[int, int]
    total_voxels: int
    foreground: list[list[float]] = Field(default_factory=list, exclude=True, repr=False)


class DatasetFingerprint(_Frozen):
    name: str
    modalities: list[str] = Field(description="Modality code per image channel (MR, CT, …).")
    labels: dict[int, str]
    case_count: int
    spacings: list[Spacing]
    shapes: list[Shape]
    intensity: list[IntensityStats] = Field(description="Per modality (image channel), foreground voxels only.")
    label_stats: dict[int, LabelStats] = Field(description="Per foreground label.")

    @property
    def median_spacing(self) -> Spacing:
        s = np.median(np.asarray(self.spacings, dtype=float), axis=0)
        return (float(s[0]), float(s[1]), float(s[2]))

    @property
    def median_shape(self) -> tuple[float, float, float]:
        s = np.median(np.asarray(self.shapes, dtype=float), axis=0)
        return (float(s[0]), float(s[1]), float(s[2]))

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str | bytes) -> DatasetFingerprint:
        return cls.model_validate_json(text)

    def save(self, path: Path) -> None:
        path.write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> DatasetFingerprint:
        return cls.from_json(path.read_text(encoding="utf-8"))


def case_fingerprint(image: np.ndarray, label: np.ndarray, spacing: Sequence[float]) -> CaseFingerprint:
    """One case. ``image`` is (X, Y, Z) or channel-first (C, X, Y, Z); ``label`` is (X, Y, Z), 0 = background."""
    label = np.asarray(label)
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[None]
    if label.ndim != 3 or image.ndim != 4 or image.shape[1:] != label.shape:
        raise ValueError(f"image {image.shape} and label {label.shape} do not match (need (C,)X,Y,Z and X,Y,Z)")
    if len(spacing) != 3 or any(float(s) <= 0 for s in spacing):
        raise ValueError(f"spacing must be three positive numbers, got {tuple(spacing)}")
    ints = np.rint(label).astype(np.int64)
    values, counts = np.unique(ints, return_counts=True)
    mask = ints > 0
    return CaseFingerprint(
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        shape=(int(label.shape[0]), int(label.shape[1]), int(label.shape[2])),
        label_voxels={int(v): int(c) for v, c in zip(values, counts, strict=True) if v > 0},
        total_voxels=int(label.size),
        foreground=[channel[mask].astype(np.float64).tolist() for channel in image],
    )


def intensity_stats(values: np.ndarray) -> IntensityStats:
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no foreground voxels: intensity statistics need at least one labelled voxel")
    p_lo, median, p_hi = np.percentile(values, [0.5, 50.0, 99.5])
    return IntensityStats(
        mean=float(values.mean()),
        std=float(values.std()),
        median=float(median),
        p00_5=float(p_lo),
        p99_5=float(p_hi),
        min=float(values.min()),
        max=float(values.max()),
        voxels=int(values.size),
    )


def combine(
    cases: Iterable[CaseFingerprint], *, name: str, modalities: Sequence[str], labels: Mapping[int, str]
) -> DatasetFingerprint:
    """The dataset's fingerprint from its cases' (``labels`` maps label values to names, background included)."""
    cases = list(cases)
    if not cases:
        raise ValueError("a fingerprint needs at least one case")
    channels = len(cases[0].foreground)
    if len(modalities) != channels or any(len(c.foreground) != channels for c in cases):
        raise ValueError(f"every case needs one image channel per modality ({list(modalities)})")
    total = sum(c.total_voxels for c in cases)
    label_stats: dict[int, LabelStats] = {}
    for value, label_name in sorted(labels.items()):
        if value == 0:
            continue
        present = [c for c in cases if c.label_voxels.get(value, 0) > 0]
        voxels = [c.label_voxels[value] for c in present]
        ml = [c.label_voxels[value] * float(np.prod(c.spacing)) / 1000.0 for c in present]
        label_stats[value] = LabelStats(
            name=label_name,
            foreground_share=sum(voxels) / total,
            median_voxels=float(np.median(voxels)) if voxels else 0.0,
            median_ml=float(np.median(ml)) if ml else 0.0,
            cases_present=len(present),
        )
    intensity = [
        intensity_stats(np.concatenate([np.asarray(c.foreground[ch]) for c in cases])) for ch in range(channels)
    ]
    return DatasetFingerprint(
        name=name,
        modalities=list(modalities),
        labels=dict(labels),
        case_count=len(cases),
        spacings=[c.spacing for c in cases],
        shapes=[c.shape for c in cases],
        intensity=intensity,
        label_stats=label_stats,
    )


def fingerprint_msd_folder(folder: Path, *, limit: int | None = None) -> DatasetFingerprint:
    """The fingerprint of an MSD folder's labelled training cases (the first ``limit`` if given), as stored:
    spacing from the NIfTI header, arrays in file order; a 4-D image has its channels last, as MSD writes."""
    import json

    index = read_msd_index(folder)
    pairs = [(image, label) for image, label in index.pairs if label is not None][: limit or None]
    if not pairs:
        raise MsdFormatError(f"{folder} has no labelled training cases")
    raw = json.loads((index.root / "dataset.json").read_text())
    names = [str(v) for _, v in sorted(dict(raw.get("modality", {})).items(), key=lambda kv: int(kv[0]))]
    modalities = [MODALITY_CODES.get(m.upper(), m.upper()) for m in names] or ["OT"]
    cases = [_read_case(image_path, label_path) for image_path, label_path in pairs]
    return combine(cases, name=index.name, modalities=modalities, labels=index.labels)


def _read_case(image_path: Path, label_path: Path) -> CaseFingerprint:
    import nibabel as nib

    img: Any = nib.load(str(image_path))  # a NIfTI image (nibabel types it as the file-based base)
    image = np.asanyarray(img.dataobj)
    if image.ndim == 4:
        image = np.moveaxis(image, -1, 0)
    seg: Any = nib.load(str(label_path))
    return case_fingerprint(image, np.asanyarray(seg.dataobj), [float(z) for z in img.header.get_zooms()[:3]])


def fingerprint_stored_cases(
    store: ObjectStore,
    cases: Iterable[tuple[str, str | None]],
    *,
    name: str,
    modality: str,
    labels: Mapping[int, str],
) -> DatasetFingerprint | None:
    """The fingerprint of raw case files in ``store``: ``cases`` are ``(image_key, label_key)`` pairs (as a
    manifest's records hold them); unlabelled ones are skipped, and None is returned when none is labelled
    (a fingerprint's statistics are over foreground voxels). Every channel of a multi-channel image is
    reported under ``modality``: a case records one modality code."""
    import tempfile

    pairs = [(image, label) for image, label in cases if label]
    if not pairs:
        return None
    fingerprints = []
    with tempfile.TemporaryDirectory(prefix="vf-fingerprint-") as workdir:
        image_path, label_path = Path(workdir) / "image.nii.gz", Path(workdir) / "label.nii.gz"
        for image_key, label_key in pairs:
            store.download_file(image_key, str(image_path))
            store.download_file(str(label_key), str(label_path))
            fingerprints.append(_read_case(image_path, label_path))
    channels = len(fingerprints[0].foreground)
    return combine(fingerprints, name=name, modalities=[modality] * channels, labels=labels)


def save_version_fingerprint(store: ObjectStore, version_id: str, fingerprint: DatasetFingerprint) -> str:
    """Write the version's fingerprint at :func:`~shared.contracts.layout.fingerprint_key`; returns the key."""
    key = fingerprint_key(version_id)
    store.put_bytes(key, fingerprint.to_json().encode(), content_type="application/json")
    return key


def load_version_fingerprint(store: ObjectStore, version_id: str) -> DatasetFingerprint | None:
    """The stored fingerprint of a dataset version, or None for a version built without one (before
    fingerprints were stored, or without labelled cases)."""
    try:
        return DatasetFingerprint.from_json(store.get_bytes(fingerprint_key(version_id)))
    except ObjectNotFoundError:
        return None
