"""Quality checks per case, and the QC report of a dataset version.

Every check is a pure function over arrays and affines that returns :class:`Finding` objects with a
stable machine-readable ``code``, a human ``message`` and a ``severity``: ``error`` excludes the case from
the version (with its reasons listed in the manifest's ``qc.excluded``, never silently), ``warning`` and
``info`` are reported and the case is kept.

Geometry is judged in world coordinates: a label may store its voxels in another axis order or
direction than the image (the TotalSegmentator label is row-flipped relative to the DICOM volume) and
still describe exactly the same grid. What matters is whether both affines put voxel centres at the same
world positions, not whether the arrays line up index by index.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "CaseQC",
    "Finding",
    "QCReport",
    "build_qc_report",
    "check_case",
    "check_case_files",
    "check_finite",
    "check_geometry",
    "check_intensity",
    "check_label_values",
    "check_spacing",
    "spacing_from_affine",
    "spacing_outliers",
]

Severity = Literal["error", "warning", "info"]

#: Fraction of a voxel by which grids may disagree (float32 NIfTI headers vs float64 DICOM geometry).
GRID_TOLERANCE_VOXELS = 0.01
#: A CT whose values never go below this is not in Hounsfield units (air is -1000 HU).
CT_MIN_AIR_HU = -500.0
#: An axis whose spacing is this many times the dataset median (or less than 1/this) is an outlier.
SPACING_OUTLIER_FACTOR = 2.0
#: In-plane vs through-plane ratio above which resampling invents most of the voxels.
ANISOTROPY_LIMIT = 6.0


@dataclass(frozen=True)
class Finding:
    code: str
    message: str
    severity: Severity = "error"

    def reason(self) -> str:
        return f"{self.code}: {self.message}"

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message, "severity": self.severity}


@dataclass
class CaseQC:
    """The findings of one case; ``passed`` is False when any finding is an error."""

    case_id: str
    findings: list[Finding] = field(default_factory=list)
    spacing: tuple[float, float, float] | None = None

    @property
    def passed(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    @property
    def reasons(self) -> list[str]:
        return [f.reason() for f in self.findings if f.severity == "error"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "passed": self.passed,
            "spacing": list(self.spacing) if self.spacing else None,
            "findings": [f.to_dict() for f in self.findings],
        }


# ------------------------------------------------------------------------------------------- checks


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    norms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return (float(norms[0]), float(norms[1]), float(norms[2]))


def check_finite(array: np.ndarray, what: str = "image") -> list[Finding]:
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array))) if np.issubdtype(array.dtype, np.floating) else 0
    if bad:
        return [Finding(f"{what}_nonfinite", f"{bad} NaN/Inf voxels in the {what}")]
    return []


def check_geometry(
    image_shape: Sequence[int],
    image_affine: np.ndarray,
    label_shape: Sequence[int],
    label_affine: np.ndarray,
    tolerance_voxels: float = GRID_TOLERANCE_VOXELS,
) -> list[Finding]:
    """Do image and label describe the same voxel grid in world space?

    The label's voxel→image-voxel map ``inv(A_image) @ A_label`` must be a signed axis permutation with an
    integer offset, and must carry the label's index box exactly onto the image's. Then every label voxel
    sits on an image voxel centre: PASS (with an ``info`` when the axes are stored in another order or
    direction). Anything else is ``geometry_mismatch``, with the largest world distance between
    corresponding grid corners in the message.
    """
    image_shape, label_shape = tuple(int(s) for s in image_shape[:3]), tuple(int(s) for s in label_shape[:3])
    a_img, a_lab = np.asarray(image_affine, np.float64), np.asarray(label_affine, np.float64)
    if abs(np.linalg.det(a_img[:3, :3])) < 1e-9 or abs(np.linalg.det(a_lab[:3, :3])) < 1e-9:
        return [Finding("geometry_degenerate_affine", "image or label affine is singular")]
    transform = np.linalg.inv(a_img) @ a_lab
    rotation, offset = transform[:3, :3], transform[:3, 3]
    permutation = np.round(rotation)
    is_signed_permutation = (
        np.allclose(rotation, permutation, atol=tolerance_voxels)
        and np.all(np.abs(permutation).sum(axis=0) == 1)
        and np.all(np.abs(permutation).sum(axis=1) == 1)
        and np.allclose(offset, np.round(offset), atol=tolerance_voxels)
    )
    if is_signed_permutation:
        corners = np.array(np.meshgrid(*[[0, n - 1] for n in label_shape], indexing="ij")).reshape(3, -1)
        mapped = np.round(permutation @ corners + np.round(offset)[:, None])
        if np.array_equal(mapped.min(axis=1), np.zeros(3)) and np.array_equal(
            mapped.max(axis=1), np.array(image_shape) - 1
        ):
            if np.array_equal(permutation, np.eye(3)):
                return []
            return [
                Finding(
                    "label_axes_reordered",
                    "label stores the image grid in another axis order/direction; aligned through the affines",
                    "info",
                )
            ]
    # Not the same grid: report how far apart the corners are in millimetres.
    img_corners = _world_corners(image_shape, a_img)
    lab_corners = _world_corners(label_shape, a_lab)
    distance = max(float(np.min(np.linalg.norm(img_corners - c, axis=1))) for c in lab_corners)
    return [
        Finding(
            "geometry_mismatch",
            f"label grid {label_shape} spacing {_fmt(spacing_from_affine(a_lab))} does not lie on image grid "
            f"{image_shape} spacing {_fmt(spacing_from_affine(a_img))} (corners up to {distance:.2f} mm apart)",
        )
    ]


def _world_corners(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape[:3]], indexing="ij")).reshape(3, -1)
    return (affine[:3, :3] @ corners + affine[:3, 3:4]).T


def _fmt(values: Iterable[float]) -> str:
    return "x".join(f"{v:.3g}" for v in values)


def check_label_values(label: np.ndarray, allowed: Iterable[int] | None = None) -> list[Finding]:
    """Integer class ids only, all of them known; a mask with no foreground is an error."""
    findings: list[Finding] = []
    if np.issubdtype(label.dtype, np.floating):
        if not np.all(np.isfinite(label)):
            return [Finding("label_nonfinite", "label contains NaN/Inf")]
        if not np.array_equal(label, np.round(label)):
            return [Finding("label_not_integer", "label has non-integer values (a probability map, not a label map?)")]
    values = {int(v) for v in np.unique(label)}
    if min(values) < 0:
        findings.append(Finding("label_negative", f"negative label values {sorted(v for v in values if v < 0)}"))
    if allowed is not None:
        allowed_set = {int(a) for a in allowed} | {0}
        unexpected = sorted(values - allowed_set)
        if unexpected:
            findings.append(
                Finding("label_unexpected_values", f"values {unexpected[:10]} are not among the dataset's labels")
            )
        missing = sorted(allowed_set - values - {0})
        if missing and values != {0}:
            findings.append(Finding("label_missing_classes", f"classes {missing[:10]} absent in this case", "warning"))
    if values == {0}:
        findings.append(Finding("label_empty", "label has no foreground voxels"))
    return findings


def check_intensity(image: np.ndarray, modality: str) -> list[Finding]:
    """Plausibility of the raw intensities for the modality (before any normalisation)."""
    finite = image[np.isfinite(image)] if np.issubdtype(image.dtype, np.floating) else image
    if finite.size == 0:
        return [Finding("image_empty", "image has no finite voxels")]
    low, high = float(finite.min()), float(finite.max())
    if low == high:
        return [Finding("image_constant", f"every voxel is {low:g}")]
    modality = modality.upper()
    if modality == "CT":
        if low > CT_MIN_AIR_HU:
            return [
                Finding(
                    "ct_not_hounsfield",
                    f"CT minimum {low:g} has no air (< {CT_MIN_AIR_HU:g}); raw stored values without rescale?",
                )
            ]
        if high > 10000 or low < -10000:
            return [Finding("intensity_out_of_range", f"CT range {low:g}..{high:g} HU is implausible", "warning")]
        return []
    if modality == "MR":
        median = float(np.median(finite[finite > 0])) if np.any(finite > 0) else 0.0
        if median > 0 and high / median > 1000:
            return [Finding("intensity_outlier_voxels", f"max {high:g} is {high / median:.0f}x the median", "warning")]
        if high > 1e4:
            return [Finding("intensity_unnormalised", f"intensities up to {high:g}: normalised by the spec", "info")]
    return []


def check_spacing(spacing: Sequence[float], anisotropy_limit: float = ANISOTROPY_LIMIT) -> list[Finding]:
    if any(not np.isfinite(s) or s <= 0 for s in spacing):
        return [Finding("spacing_invalid", f"voxel spacing {_fmt(spacing)} mm is not positive")]
    ratio = max(spacing) / min(spacing)
    if ratio > anisotropy_limit:
        return [Finding("spacing_anisotropic", f"spacing {_fmt(spacing)} mm (ratio {ratio:.1f})", "warning")]
    return []


def spacing_outliers(
    spacings: dict[str, Sequence[float]], factor: float = SPACING_OUTLIER_FACTOR
) -> dict[str, list[Finding]]:
    """Cases whose spacing along some axis is more than ``factor`` away from the dataset median."""
    if len(spacings) < 3:
        return {}
    ids = list(spacings)
    values = np.array([list(spacings[i])[:3] for i in ids], dtype=np.float64)
    median = np.median(values, axis=0)
    out: dict[str, list[Finding]] = {}
    for case_id, row in zip(ids, values, strict=True):
        ratio = np.maximum(row / median, median / row)
        if np.any(ratio > factor):
            out[case_id] = [
                Finding("spacing_outlier", f"spacing {_fmt(row)} mm vs dataset median {_fmt(median)} mm", "warning")
            ]
    return out


def check_case(
    case_id: str,
    image: np.ndarray,
    image_affine: np.ndarray,
    *,
    modality: str,
    label: np.ndarray | None = None,
    label_affine: np.ndarray | None = None,
    allowed_labels: Iterable[int] | None = None,
) -> CaseQC:
    """All per-case checks. A 4-D image must have one channel/time point (``(X, Y, Z, 1)``)."""
    result = CaseQC(case_id)
    image = _squeeze3d(image)
    if image.ndim != 3:
        result.findings.append(Finding("image_not_3d", f"image has shape {image.shape}, expected a 3-D volume"))
        return result
    result.spacing = spacing_from_affine(image_affine)
    result.findings += check_spacing(result.spacing)
    result.findings += check_finite(image, "image")
    result.findings += check_intensity(image, modality)
    if label is not None:
        label = _squeeze3d(label)
        if label.ndim != 3:
            result.findings.append(Finding("label_not_3d", f"label has shape {label.shape}, expected 3-D"))
            return result
        result.findings += check_geometry(
            image.shape, image_affine, label.shape, image_affine if label_affine is None else label_affine
        )
        result.findings += check_label_values(label, allowed_labels)
    return result


def _squeeze3d(array: np.ndarray) -> np.ndarray:
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return array


def check_case_files(
    case_id: str,
    image_path: str | Path,
    label_path: str | Path | None,
    *,
    modality: str,
    allowed_labels: Iterable[int] | None = None,
) -> CaseQC:
    """:func:`check_case` on NIfTI files (read with nibabel; an unreadable file is itself a finding)."""
    import nibabel as nib

    image: Any
    label: Any
    try:
        image = nib.load(str(image_path))
        image_array = np.asanyarray(image.dataobj)
        label = nib.load(str(label_path)) if label_path is not None else None
        label_array = np.asanyarray(label.dataobj) if label is not None else None
    except Exception as exc:
        return CaseQC(case_id, [Finding("unreadable", f"{type(exc).__name__}: {exc}")])
    return check_case(
        case_id,
        image_array,
        image.affine,
        modality=modality,
        label=label_array,
        label_affine=label.affine if label is not None else None,
        allowed_labels=allowed_labels,
    )


# ------------------------------------------------------------------------------------------- report


@dataclass
class QCReport:
    """The QC of one dataset version: which cases are excluded and why, and counts per finding code."""

    version_id: str | None
    created_at: str
    cases: list[CaseQC]

    @property
    def excluded(self) -> dict[str, list[str]]:
        """``{case_id: ["code: message", ...]}``: what goes into the manifest's ``qc.excluded``."""
        return {c.case_id: c.reasons for c in self.cases if not c.passed}

    @property
    def passed_ids(self) -> list[str]:
        return [c.case_id for c in self.cases if c.passed]

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(f.code for c in self.cases for f in c.findings).items()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "version_id": self.version_id,
            "created_at": self.created_at,
            "n_cases": len(self.cases),
            "n_passed": len(self.passed_ids),
            "n_excluded": len(self.excluded),
            "excluded": self.excluded,
            "finding_counts": self.counts(),
            "cases": [c.to_dict() for c in self.cases],
        }


def build_qc_report(
    results: Iterable[CaseQC], *, version_id: str | None = None, spacing_outlier_factor: float = SPACING_OUTLIER_FACTOR
) -> QCReport:
    """Merge per-case results with the dataset-level spacing-outlier check into one report."""
    cases = list(results)
    spacings = {c.case_id: c.spacing for c in cases if c.spacing is not None}
    for case_id, findings in spacing_outliers(spacings, spacing_outlier_factor).items():  # type: ignore[arg-type]
        next(c for c in cases if c.case_id == case_id).findings.extend(findings)
    return QCReport(version_id=version_id, created_at=datetime.now(UTC).isoformat(), cases=cases)
