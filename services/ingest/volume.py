"""DICOM series -> 3-D or 4-D volume(s) with correct world geometry, as dcm2niix builds them.

This module is deliberately thin glue around the field's libraries:

* ``highdicom.get_volume_from_series`` sorts single-frame instances along the
  slice normal, checks that the spacing is regular and applies the modality
  (Rescale Slope/Intercept) transform;
* ``highdicom.Image.get_volume`` does the same for Enhanced multi-frame
  objects, reading geometry from the Shared/Per-Frame Functional Groups;
* ``highdicom.Volume`` owns the affine (LPS internally) and converts it to RAS;
* ``nibabel.nicom`` reads the Siemens CSA header (images in a mosaic, slice
  normal, b-value, gradient direction) and corrects the mosaic position;
* ``scipy.ndimage.affine_transform`` resamples a gantry-tilted (sheared)
  stack onto a regular grid; ``nibabel`` writes NIfTI.

What is written here is what those libraries do *not* do for an ingest
service, and what dcm2niix does (docs/ingest-reconstruction.md says where we match it):

* cut Siemens mosaics and UIH grids into their slices (one mosaic file per
  time point), each slice with its own position, and rebuild them as a stack;
* split a series whose slices repeat positions into one volume per echo
  (labels ``e1``, ``e2``...) and, per echo, a 4-D volume over time or
  diffusion direction, with b-values and b-vectors;
* collapse duplicate slices whose pixels are identical (a resent instance
  under a new UID), and flag gaps with where they are;
* resample a CT stack acquired with gantry tilt onto a regular grid and
  record the tilt angle;
* decide up front whether a series should become a volume at all, and say why
  not with a machine-readable reason code (:class:`NonVolumetricSeriesError`)
  instead of silently producing a wrong volume; split an enhanced object that
  multiplexes several image types (Philips B0 field map = magnitude + field
  map); stack several enhanced files of one series into a 4-D time series; and
  work around one highdicom 0.28 limitation (private Dimension Index Pointers,
  see :func:`_drop_private_dimension_indices`).

Conventions of the returned :class:`SeriesVolume` (the contract, docs/contracts.md):

* array axes are ``(column, row, slice[, frame])`` - the NIfTI/ITK order
  ``(i, j, k[, t])`` where ``i`` walks along a DICOM row - so that
  ``affine @ [i, j, k, 1]`` is the RAS world position (mm) of a voxel centre;
  axis 3, when present, is time or diffusion direction (``metadata["frame_axis"]``);
* slice spacing always comes from ImagePositionPatient (via highdicom), never
  from SliceThickness, which differs whenever slices have gaps or overlap.
"""

from __future__ import annotations

import copy
import hashlib
import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
from highdicom.spatial import get_series_volume_positions
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_rescale, get_decoder
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian
from scipy.ndimage import affine_transform

with warnings.catch_warnings():  # "The DICOM readers are highly experimental": we use only the CSA/mosaic parts
    warnings.simplefilter("ignore", UserWarning)
    from nibabel.nicom import csareader
    from nibabel.nicom.dicomwrappers import MosaicWrapper

__all__ = [
    "NonVolumetricSeriesError",
    "SeriesVolume",
    "reconstruct_series",
]

# Tolerances. Orientation cosines are written with ~6-10 significant digits by
# scanners, so exact comparison (highdicom's default) rejects real series.
_ORIENTATION_TOL = 1e-4
# Pixel spacing may be written with different rounding in one series.
_PIXEL_SPACING_RTOL = 1e-4
# Slice spacing regularity, relative (highdicom's default).
_SPACING_RTOL = 0.01
# Two slices closer than this (mm) along every axis are at one position.
_POSITION_TOL_MM = 1e-2
# A stack whose in-plane drift per slice is below this fraction of the slice step is perpendicular.
_SHEAR_TOL = 1e-3

# Secondary Capture family: screenshots / scanned documents / burnt-in
# reformats. Even the multi-frame grayscale variants carry no reliable patient
# geometry, so they are never turned into a volume.
_SECONDARY_CAPTURE_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
        "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit SC
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
        "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
        "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
    }
)

_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

# Frame Type value 4 (Enhanced MR/CT) -> human label of the split volume.
_FRAME_TYPE_LABELS = {
    "M": "magnitude",
    "MAGNITUDE": "magnitude",
    "P": "phase",
    "PHASE": "phase",
    "R": "real",
    "REAL": "real",
    "I": "imaginary",
    "IMAGINARY": "imaginary",
    "FIELD_MAP": "fieldmap",
    "B0_MAP": "fieldmap",
}

# United Imaging (UIH) private block of the grid ("VFRAME") layout, as dcm2niix reads it.
_UIH_CREATOR = "Image Private Header"
_UIH_IMAGES_IN_GRID = 0x50  # (0065,1050) DS
_UIH_FRAME_SEQUENCE = 0x51  # (0065,1051) SQ: one item per slice with its ImagePositionPatient
_UIH_B_VALUE = 0x09  # (0065,1009) FD
_UIH_GRADIENT = 0x37  # (0065,1037) FD, in the image frame (row, column, normal)


class NonVolumetricSeriesError(ValueError):
    """The files cannot be honestly represented as one regular voxel grid.

    ``reason_code`` is stable and machine-readable so the ingest service can
    route or report the series (``secondary_capture``, ``localizer``,
    ``single_slice``, ``mixed_orientation``, ``mixed_geometry``,
    ``mixed_series``, ``missing_slices``, ``duplicate_positions``,
    ``non_perpendicular_stack``, ``no_pixel_data``, ``undecodable_pixel_data``, ``unsupported``);
    ``message`` is for humans and says where (the gap's positions, the slices that repeat);
    ``details`` holds the same facts machine-readably (``{"gaps": [...]}`` for ``missing_slices``).
    """

    def __init__(self, reason_code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{reason_code}: {message}")
        self.reason_code = reason_code
        self.message = message
        self.details = details or {}


@dataclass(frozen=True, eq=False)
class SeriesVolume:
    """One voxel grid reconstructed from a DICOM series.

    Attributes:
        array: voxel values after Rescale Slope/Intercept, axes
            ``(column, row, slice[, frame])``; ``int16`` when that is lossless,
            else ``float32``.
        affine: 4x4 voxel-index -> RAS world (mm) matrix, as NIfTI expects
            (DICOM's LPS is converted by highdicom).
        label: which volume of the series this is when a series holds
            several (``"magnitude"``, ``"fieldmap"``, ``"e2"`` for the second
            echo...); ``""`` when the series is a single volume.
        source_sop_instance_uids: for single-frame series one UID per slice,
            slice fastest then frame (``k + n_slices * t``); for mosaics and
            enhanced multi-frame series one UID per source file, in the order
            of axis 3 when there are several.
        series_instance_uid: SeriesInstanceUID of the sources.
        b_values: diffusion b-value (s/mm²) of each frame (axis 3) when the
            series is diffusion weighted, else empty.
        b_vectors: unit gradient direction of each frame in RAS world
            coordinates ((0, 0, 0) for b = 0), same length as ``b_values``.
            :meth:`fsl_bvecs` gives them in FSL's voxel convention, as dcm2niix writes them.
        metadata: what the reconstruction did, JSON-serialisable:
            ``frame_axis`` (``"time"`` or ``"diffusion"``, 4-D only),
            ``gantry_tilt_deg`` and ``resampled`` (a tilted stack put on a
            regular grid), ``duplicates_collapsed`` (identical slices
            dropped), ``echo_time_ms``, ``mosaic`` (``"siemens"``/``"uih"``).
    """

    array: np.ndarray
    affine: np.ndarray
    label: str = ""
    source_sop_instance_uids: tuple[str, ...] = ()
    series_instance_uid: str = ""
    b_values: tuple[float, ...] = ()
    b_vectors: tuple[tuple[float, float, float], ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) along array axes 0, 1, 2, from the affine columns."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(norms[0]), float(norms[1]), float(norms[2]))

    @property
    def frames(self) -> int:
        """Number of frames along axis 3 (1 for a 3-D volume)."""
        return int(self.array.shape[3]) if self.array.ndim == 4 else 1

    def fsl_bvecs(self) -> np.ndarray:
        """b-vectors as FSL (and dcm2niix's ``.bvec``) expect them: ``(3, frames)``, in the voxel axes of the
        written NIfTI, with x negated when the affine's determinant is positive (FSL's radiological
        voxel order)."""
        rotation = self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0)
        vectors = np.asarray(self.b_vectors, dtype=float).reshape(-1, 3) @ rotation  # = R^T g per frame
        if np.linalg.det(rotation) > 0:
            vectors[:, 0] = -vectors[:, 0]
        return vectors.T

    def to_nifti(self) -> nib.Nifti1Image:
        """NIfTI-1 image with qform and sform both set to scanner (code 1).

        Both codes are set because readers differ in which one they trust
        (ITK prefers qform, nibabel/FSL the sform); with code 0 some tools
        fall back to a voxel-only affine and silently lose the geometry.
        """
        image = nib.Nifti1Image(self.array, self.affine)
        image.header.set_qform(self.affine, code=1)
        image.header.set_sform(self.affine, code=1)
        image.header.set_xyzt_units(xyz="mm", t="sec")
        return image


def reconstruct_series(paths: Sequence[str | Path]) -> list[SeriesVolume]:
    """Reconstruct the volume(s) of one SeriesInstanceUID's files.

    Returns one :class:`SeriesVolume` per image type or echo in the series
    (normally one). Raises :class:`NonVolumetricSeriesError` whenever the
    files do not form a regular grid, rather than guessing.
    """
    if not paths:
        raise NonVolumetricSeriesError("no_pixel_data", "no files given")
    datasets = [_read(Path(p)) for p in paths]
    _check_series_level(datasets)

    multi = [ds for ds in datasets if _is_enhanced(ds)]
    if multi and len(multi) != len(datasets):
        raise NonVolumetricSeriesError("unsupported", "series mixes enhanced multi-frame and single-frame instances")
    if multi:
        return _reconstruct_enhanced(datasets)
    return _reconstruct_single_frame(datasets)


# --------------------------------------------------------------------------- checks


def _read(path: Path) -> Dataset:
    """Read one file; fill empty SOP Class/Instance UIDs from the file meta.

    Real anonymised data (the TotalSegmentator CT example) has *empty*
    SOPClassUID/SOPInstanceUID in the dataset but correct values in the
    File Meta Information; highdicom needs the SOP class to pick the IOD.
    """
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError) as exc:
        raise NonVolumetricSeriesError("unsupported", f"{path}: not readable as DICOM ({exc})") from exc
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        for keyword, meta_keyword in (
            ("SOPClassUID", "MediaStorageSOPClassUID"),
            ("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
        ):
            if not ds.get(keyword) and meta.get(meta_keyword):
                setattr(ds, keyword, meta.get(meta_keyword))
    return ds


def _image_types(ds: Dataset) -> set[str]:
    """ImageType values, plus Frame Type values of enhanced per-frame groups."""
    values = {str(v).upper() for v in ds.get("ImageType", [])}
    for group in _frame_groups(ds):
        ftype = _frame_type(group)
        values.update(v.upper() for v in ftype)
    return values


def _undecodable_reason(ds: Dataset) -> str | None:
    """Why this instance's pixel data cannot be decoded here (its transfer syntax has no installed
    decoder), or None. Such instances are stored as sent; their series is flagged, not a task error."""
    meta = getattr(ds, "file_meta", None)
    transfer_syntax = UID(str(meta.get("TransferSyntaxUID", "") or "")) if meta is not None else UID("")
    if not transfer_syntax or not transfer_syntax.is_transfer_syntax or not transfer_syntax.is_compressed:
        return None
    try:
        available = get_decoder(transfer_syntax).is_available
    except NotImplementedError:
        available = False
    if available:
        return None
    return f"no installed decoder for transfer syntax {transfer_syntax} ({transfer_syntax.name})"


def _check_series_level(datasets: Sequence[Dataset]) -> None:
    """Flags that depend only on headers, checked before any decoding."""
    for ds in datasets:
        undecodable = _undecodable_reason(ds)
        if undecodable:
            raise NonVolumetricSeriesError("undecodable_pixel_data", undecodable)
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class in _SECONDARY_CAPTURE_SOP_CLASSES:
            raise NonVolumetricSeriesError(
                "secondary_capture",
                f"{ds.get('SOPInstanceUID', '?')} is Secondary Capture: no reliable patient geometry",
            )
    for ds in datasets:
        if not any(kw in ds for kw in _PIXEL_DATA_KEYWORDS):
            raise NonVolumetricSeriesError("no_pixel_data", f"{ds.get('SOPInstanceUID', '?')} has no pixel data")
    for ds in datasets:
        if "LOCALIZER" in _image_types(ds):
            raise NonVolumetricSeriesError("localizer", f"{ds.get('SOPInstanceUID', '?')} is a localizer (scout) image")
    for ds in datasets:
        if str(ds.get("PhotometricInterpretation", "MONOCHROME2")) not in ("MONOCHROME1", "MONOCHROME2"):
            raise NonVolumetricSeriesError(
                "unsupported", f"photometric interpretation {ds.PhotometricInterpretation} is not grayscale"
            )


def _orientation(ds: Dataset) -> np.ndarray | None:
    value = ds.get("ImageOrientationPatient")
    return None if value is None else np.asarray(value, dtype=float)


def _check_single_frame_geometry(datasets: Sequence[Dataset]) -> None:
    """Consistency flags highdicom would otherwise report as bare ValueErrors."""
    first = datasets[0]
    for ds in datasets:
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            raise NonVolumetricSeriesError(
                "unsupported", f"{ds.get('SOPInstanceUID', '?')} has no patient geometry (IPP/IOP)"
            )
    ref_iop = _orientation(first)
    for ds in datasets[1:]:
        iop = _orientation(ds)
        if iop is None or ref_iop is None or not np.allclose(iop, ref_iop, atol=_ORIENTATION_TOL):
            raise NonVolumetricSeriesError(
                "mixed_orientation",
                f"ImageOrientationPatient differs: {ref_iop} vs {iop}",
            )
    ref_shape = (first.Rows, first.Columns)
    ref_ps = np.asarray(first.get("PixelSpacing", [0, 0]), dtype=float)
    for ds in datasets[1:]:
        ps = np.asarray(ds.get("PixelSpacing", [0, 0]), dtype=float)
        if (ds.Rows, ds.Columns) != ref_shape or not np.allclose(ps, ref_ps, rtol=_PIXEL_SPACING_RTOL):
            raise NonVolumetricSeriesError(
                "mixed_geometry",
                f"matrix/pixel spacing differ: {ref_shape} {ref_ps} vs {(ds.Rows, ds.Columns)} {ps}",
            )
    for keyword in ("SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(ds.get(keyword, "")) for ds in datasets}
        if len(values) > 1:
            raise NonVolumetricSeriesError("mixed_series", f"{len(values)} different {keyword} values")


# --------------------------------------------------------------------- conversion


def _to_series_volume(volume: hd.Volume, *, label: str, uids: Sequence[str], series_uid: str) -> SeriesVolume:
    """highdicom Volume (slice, row, column; LPS) -> SeriesVolume (i, j, k; RAS)."""
    volume = volume.permute_spatial_axes([2, 1, 0])
    return SeriesVolume(
        array=_compact_dtype(volume.array),
        affine=np.asarray(volume.get_affine("RAS"), dtype=float),
        label=label,
        source_sop_instance_uids=tuple(uids),
        series_instance_uid=series_uid,
    )


def _compact_dtype(array: np.ndarray) -> np.ndarray:
    """int16 when rescaled values are integers in range (lossless), else float32.

    float32 holds every 16-bit stored value times a slope exactly enough for
    imaging; int16 halves memory for the common CT/MR case and matches what
    dcm2niix writes.
    """
    if array.size and np.all(np.isfinite(array)):
        lo, hi = float(array.min()), float(array.max())
        if lo >= np.iinfo(np.int16).min and hi <= np.iinfo(np.int16).max and np.all(array == np.round(array)):
            return array.astype(np.int16)
    return array.astype(np.float32)


_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


# ------------------------------------------------------------- single-frame series


@dataclass(eq=False)
class _Slice:
    """One 2-D image of a single-frame series: an instance, or one tile of a mosaic/grid.

    ``source_uid`` is the SOPInstanceUID of the file it came from (shared by every tile of a mosaic);
    ``diffusion`` is ``(b-value, unit gradient in LPS)`` when the header carries one.
    """

    ds: Dataset
    source_uid: str
    order: tuple[Any, ...]
    diffusion: tuple[float, tuple[float, float, float]] | None = None
    _digest: str | None = None

    @property
    def position(self) -> np.ndarray:
        return np.asarray(self.ds.ImagePositionPatient, dtype=float)

    def pixel_digest(self) -> str:
        """sha256 of the decoded stored pixels: two slices with equal digests are one image sent twice."""
        if self._digest is None:
            self._digest = hashlib.sha256(np.ascontiguousarray(self.ds.pixel_array).tobytes()).hexdigest()
        return self._digest


def _order_key(ds: Dataset) -> tuple[Any, ...]:
    """The order of repeated acquisitions of one position: InstanceNumber first, as dcm2niix sorts."""
    number = ds.get("InstanceNumber")
    return (
        int(number) if number not in (None, "") else 0,
        str(ds.get("AcquisitionDateTime", "") or ""),
        str(ds.get("AcquisitionTime", "") or ""),
        str(ds.get("SOPInstanceUID", "")),
    )


def _reconstruct_single_frame(datasets: list[Dataset]) -> list[SeriesVolume]:
    """Single-frame instances (or mosaics) -> one volume per echo, 4-D where positions repeat."""
    if len(datasets) == 1 and _mosaic_kind(datasets[0]) is None:
        raise NonVolumetricSeriesError("single_slice", "a single 2-D image is not a volume")
    series_uid = str(datasets[0].SeriesInstanceUID)
    slices: list[_Slice] = []
    mosaic_kinds = set()
    for ds in datasets:
        kind = _mosaic_kind(ds)
        mosaic_kinds.add(kind)
        slices.extend(_mosaic_slices(ds, kind) if kind else [_Slice(ds, str(ds.SOPInstanceUID), _order_key(ds))])
        if kind is None:
            slices[-1].diffusion = _diffusion(ds)
    if len(mosaic_kinds) > 1:
        raise NonVolumetricSeriesError("unsupported", "series mixes mosaic and plain single-frame images")
    mosaic = next(iter(mosaic_kinds))
    _check_single_frame_geometry([s.ds for s in slices])  # on the tiles: a UIH grid has positions per tile only

    echoes = _split_echoes(slices)
    results = []
    for echo_index, (echo_time, echo_slices) in enumerate(echoes):
        volume = _build_single_frame(echo_slices, series_uid=series_uid, per_file_uids=mosaic is not None)
        metadata = dict(volume.metadata)
        if mosaic:
            metadata["mosaic"] = mosaic
        label = ""
        if len(echoes) > 1:
            label = f"e{echo_index + 1}"
            metadata["echo_time_ms"] = echo_time
        results.append(
            SeriesVolume(
                array=volume.array,
                affine=volume.affine,
                label=label,
                source_sop_instance_uids=volume.source_sop_instance_uids,
                series_instance_uid=series_uid,
                b_values=volume.b_values,
                b_vectors=volume.b_vectors,
                metadata=metadata,
            )
        )
    return results


def _split_echoes(slices: list[_Slice]) -> list[tuple[float | None, list[_Slice]]]:
    """Group slices by echo (EchoNumbers, else EchoTime): dcm2niix writes one file per echo (``_e2``...)."""
    by_echo: dict[Any, list[_Slice]] = defaultdict(list)
    for item in slices:
        number = item.ds.get("EchoNumbers")
        echo_time = item.ds.get("EchoTime")
        key = (
            int(number) if number not in (None, "") else None,
            float(echo_time) if echo_time not in (None, "") else None,
        )
        by_echo[key].append(item)
    if len(by_echo) == 1:
        return [(None, slices)]
    numbers = {number for number, _ in by_echo}
    if None not in numbers and len(numbers) == len(by_echo):
        keys = sorted(by_echo, key=lambda key: key[0])
    elif all(echo_time is not None for _, echo_time in by_echo):
        # echo numbers missing or repeated (several echo times per number): the echo time decides
        merged: dict[Any, list[_Slice]] = defaultdict(list)
        for (_, echo_time), group in by_echo.items():
            merged[(None, echo_time)].extend(group)
        by_echo = merged
        keys = sorted(by_echo, key=lambda key: key[1])
    else:
        return [(None, slices)]
    if len(keys) == 1:
        return [(None, slices)]
    return [(key[1], by_echo[key]) for key in keys]


def _group_positions(slices: Sequence[_Slice]) -> list[list[_Slice]]:
    """Slices grouped by position (within 0.01 mm), each group in acquisition order."""
    groups: list[list[_Slice]] = []
    anchors: list[np.ndarray] = []
    for item in slices:
        position = item.position
        for anchor, group in zip(anchors, groups, strict=True):
            if np.all(np.abs(anchor - position) <= _POSITION_TOL_MM):
                group.append(item)
                break
        else:
            anchors.append(position)
            groups.append([item])
    for group in groups:
        group.sort(key=lambda s: s.order)
    return groups


def _collapse_duplicates(groups: list[list[_Slice]]) -> int:
    """Drop, in place, the later of two slices at one position with identical pixels; returns how many.

    Decoding every image twice would double the cost of a 4-D series, whose repeats are genuine, so pixels
    are compared only where a duplicate is possible: positions repeated unevenly, or two images at one
    position under one InstanceNumber (a resend keeps its number; a time point has its own).
    """
    uneven = len({len(group) for group in groups}) > 1
    dropped = 0
    for group in groups:
        if len(group) < 2:
            continue
        numbers = [item.order[0] for item in group]
        if not uneven and len(set(numbers)) == len(numbers):
            continue
        seen: set[str] = set()
        kept = []
        for item in group:
            digest = item.pixel_digest()
            if digest in seen:
                dropped += 1
                continue
            seen.add(digest)
            kept.append(item)
        group[:] = kept
    return dropped


def _describe_position(ds: Dataset, normal: np.ndarray) -> str:
    position = np.asarray(ds.ImagePositionPatient, dtype=float)
    return f"{float(position @ normal):.2f} mm along the normal (IPP {np.round(position, 2).tolist()})"


def _build_single_frame(slices: list[_Slice], *, series_uid: str, per_file_uids: bool) -> SeriesVolume:
    """One echo's slices -> a 3-D volume, or 4-D when every position repeats equally often."""
    row, column = np.reshape(np.asarray(slices[0].ds.ImageOrientationPatient, dtype=float), (2, 3))
    normal = np.cross(row, column)
    groups = _group_positions(slices)
    collapsed = _collapse_duplicates(groups)
    counts = sorted({len(group) for group in groups})
    if len(counts) > 1:
        common = max(counts, key=lambda n: sum(len(g) == n for g in groups))
        odd = [g for g in groups if len(g) != common]
        where = "; ".join(f"{len(g)} at {_describe_position(g[0].ds, normal)}" for g in odd[:5])
        raise NonVolumetricSeriesError(
            "duplicate_positions",
            f"positions repeat unevenly ({common} images at most positions, but {where}): "
            "not a time series, and the repeated images differ so they are not duplicates",
            {"positions": [[float(v) for v in g[0].position] for g in odd], "counts": [len(g) for g in odd]},
        )
    n_frames = counts[0]
    frames = [[group[t] for group in groups] for t in range(n_frames)]
    if n_frames > 1 and len(groups) == 1:
        raise NonVolumetricSeriesError("single_slice", f"one position repeated {n_frames} times: not a volume")
    built = [_stack_volume(frame_slices, normal) for frame_slices in frames]
    first_volume, first_order, metadata = built[0]
    for volume, _, _ in built[1:]:
        if volume.shape != first_volume.shape or not np.allclose(volume.affine, first_volume.affine, atol=1e-3):
            raise NonVolumetricSeriesError("mixed_geometry", "the repeated volumes of the series have different grids")
    if collapsed:
        metadata["duplicates_collapsed"] = collapsed
    if per_file_uids:
        uids = tuple(dict.fromkeys(frame[0].source_uid for frame in frames))
    else:
        uids = tuple(frames[t][n].source_uid for t in range(n_frames) for n in first_order)
    if n_frames == 1:
        return SeriesVolume(
            array=first_volume.array,
            affine=first_volume.affine,
            source_sop_instance_uids=uids,
            series_instance_uid=series_uid,
            metadata=metadata,
        )
    b_values, b_vectors, metadata["frame_axis"] = _frame_diffusion_table([frame[0].diffusion for frame in frames])
    return SeriesVolume(
        array=_compact_dtype(np.stack([volume.array for volume, _, _ in built], axis=-1)),
        affine=first_volume.affine,
        source_sop_instance_uids=uids,
        series_instance_uid=series_uid,
        b_values=b_values,
        b_vectors=b_vectors,
        metadata=metadata,
    )


@dataclass(frozen=True, eq=False)
class _Grid:
    array: np.ndarray
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)


def _stack_volume(slices: list[_Slice], normal: np.ndarray) -> tuple[_Grid, list[int], dict[str, Any]]:
    """Distinct positions -> one regular grid. Returns it, the order of ``slices`` along axis 2, and what was done.

    A stack whose positions advance along the slice normal goes to highdicom. One whose positions advance
    regularly but obliquely (CT gantry tilt: the images are tilted, the table moves straight) is resampled
    onto a regular grid. Gaps and irregular spacing are flagged with where they are.
    """
    if len(slices) == 1:
        raise NonVolumetricSeriesError("single_slice", "a single 2-D image is not a volume")
    datasets = [s.ds for s in slices]
    positions = np.array([s.position for s in slices])
    along = positions @ normal
    order = [int(n) for n in np.argsort(along, kind="stable")]
    steps = np.diff(positions[order], axis=0)
    normal_steps = steps @ normal
    base = float(np.min(normal_steps))
    if base <= _POSITION_TOL_MM:  # cannot happen after grouping, unless positions differ only in-plane
        raise NonVolumetricSeriesError("duplicate_positions", "several images share one slice position")
    ratios = normal_steps / base
    if np.any(np.abs(ratios - 1.0) > _SPACING_RTOL):
        raise _gap_error(datasets, order, along, normal_steps, base, normal)
    in_plane = steps - np.outer(normal_steps, normal)
    drift = np.linalg.norm(in_plane, axis=1)
    if float(np.max(drift)) <= _SHEAR_TOL * base:
        kwargs: dict[str, Any] = {"rtol": _SPACING_RTOL, "orientation_tol": _ORIENTATION_TOL}
        spacing, volume_positions = get_series_volume_positions(datasets, **kwargs)
        if spacing is None or volume_positions is None:
            raise NonVolumetricSeriesError("unsupported", "highdicom found no regular stack in the slices")
        # highdicom chooses the slice direction (right-handed axes): axis 2 follows its positions
        order = sorted(range(len(datasets)), key=lambda n: volume_positions[n])
        try:
            volume = hd.get_volume_from_series(datasets, dtype=np.float32, apply_real_world_transform=False, **kwargs)
        except ValueError as exc:  # any inconsistency our checks did not anticipate
            raise NonVolumetricSeriesError("unsupported", f"highdicom refused the series: {exc}") from exc
        converted = _to_series_volume(volume, label="", uids=(), series_uid="")
        return _Grid(converted.array, converted.affine), order, {}
    mean_step = steps.mean(axis=0)
    if np.max(np.linalg.norm(steps - mean_step, axis=1)) > _SPACING_RTOL * float(np.linalg.norm(mean_step)):
        raise NonVolumetricSeriesError(
            "non_perpendicular_stack",
            "slices drift in-plane irregularly from one to the next (not a gantry tilt): "
            f"in-plane steps {np.round(drift, 3).tolist()} mm",
        )
    return _resample_tilted(slices, order, mean_step, normal)


def _gap_error(
    datasets: Sequence[Dataset],
    order: Sequence[int],
    along: np.ndarray,
    normal_steps: np.ndarray,
    base: float,
    normal: np.ndarray,
) -> NonVolumetricSeriesError:
    """Missing slices (a step that is a whole multiple of the smallest one) or irregular spacing, with where."""
    ratios = normal_steps / base
    whole = np.abs(ratios - np.round(ratios)) <= _SPACING_RTOL * np.round(ratios)
    if not np.all(whole):
        return NonVolumetricSeriesError(
            "missing_slices",
            f"irregular slice spacing along the normal: steps {np.round(normal_steps, 3).tolist()} mm",
            {"steps_mm": [float(v) for v in normal_steps]},
        )
    gaps: list[dict[str, Any]] = []
    for n in (int(v) for v in np.flatnonzero(np.round(ratios) > 1)):
        before, after = datasets[order[n]], datasets[order[n + 1]]
        missing = round(float(ratios[n])) - 1
        gaps.append(
            {
                "after_mm": float(along[order[n]]),
                "before_mm": float(along[order[n + 1]]),
                "missing_slices": missing,
                "missing_at_mm": [float(along[order[n]] + base * (m + 1)) for m in range(missing)],
                "after_sop_instance_uid": str(before.get("SOPInstanceUID", "")),
                "before_sop_instance_uid": str(after.get("SOPInstanceUID", "")),
                "after_instance_number": int(before.get("InstanceNumber", 0) or 0),
                "before_instance_number": int(after.get("InstanceNumber", 0) or 0),
            }
        )
    where = "; ".join(
        f"{g['missing_slices']} slice(s) missing between {g['after_mm']:.2f} and {g['before_mm']:.2f} mm along the "
        f"normal (after instance {g['after_instance_number']}, at {_short_list(g['missing_at_mm'])})"
        for g in gaps
    )
    return NonVolumetricSeriesError(
        "missing_slices", f"{len(gaps)} gap(s) in a {base:.3f} mm stack: {where}", {"spacing_mm": base, "gaps": gaps}
    )


def _short_list(values: Sequence[float]) -> str:
    """At most four positions spelled out (a far outlier slice would otherwise list hundreds)."""
    if len(values) <= 4:
        return ", ".join(f"{v:.2f}" for v in values)
    return f"{values[0]:.2f}, {values[1]:.2f} ... {values[-1]:.2f}"


def _rescaled_pixels(ds: Dataset) -> np.ndarray:
    return np.asarray(apply_rescale(ds.pixel_array, ds), dtype=np.float32)


def _resample_tilted(
    slices: list[_Slice], order: list[int], step: np.ndarray, normal: np.ndarray
) -> tuple[_Grid, list[int], dict[str, Any]]:
    """A regular but sheared stack (gantry tilt) -> the same voxels resampled onto a regular grid.

    The source grid is exact in world space: voxel (i, j, k) lies at ``IPP_0 + i*dx*row + j*dy*column +
    k*step``, a sheared affine. The target keeps the in-plane axes and spacing and puts the slice axis on
    the normal, at the perpendicular slice distance, grown in-plane to cover every source voxel (as
    dcm2niix's ``_Tilt`` output). Linear interpolation (scipy.ndimage.affine_transform) within each
    slice, where the shear moves the content; the voxels outside the acquired field get the
    PixelPaddingValue or the darkest value, as dcm2niix does. Integers stay integers (rounded).
    """
    first = slices[order[0]].ds
    row, column = np.reshape(np.asarray(first.ImageOrientationPatient, dtype=float), (2, 3))
    dy, dx = (float(v) for v in first.PixelSpacing)  # row spacing (between rows), column spacing
    stack = np.stack([_rescaled_pixels(slices[n].ds).T for n in order], axis=-1)  # (column, row, slice)
    source_lps = np.eye(4)
    source_lps[:3, 0], source_lps[:3, 1], source_lps[:3, 2] = row * dx, column * dy, step
    source_lps[:3, 3] = slices[order[0]].position
    slice_distance = float(step @ normal)
    target_lps = source_lps.copy()
    target_lps[:3, 2] = normal * slice_distance
    # grow the target in-plane so that every source voxel centre lies inside it
    corners = np.array(
        [
            [i, j, k, 1.0]
            for i in (0, stack.shape[0] - 1)
            for j in (0, stack.shape[1] - 1)
            for k in (0, stack.shape[2] - 1)
        ]
    ).T
    in_target = (np.linalg.inv(target_lps) @ source_lps @ corners)[:3]
    low = np.floor(in_target.min(axis=1) + 1e-6)
    high = np.ceil(in_target.max(axis=1) - 1e-6)
    low[2], high[2] = 0, stack.shape[2] - 1
    target_lps[:3, 3] = (target_lps @ np.array([*low, 1.0]))[:3]
    shape = tuple(int(h - lo + 1) for lo, h in zip(low, high, strict=True))
    target_ras = _LPS_TO_RAS @ target_lps
    padding = first.get("PixelPaddingValue")
    signed = int(first.get("PixelRepresentation", 0)) == 1
    if padding is not None and signed and padding >= 2 ** (first.BitsAllocated - 1):
        padding -= 2**first.BitsAllocated  # US/SS is ambiguous in implicit VR: a signed image's padding is signed
    fill = float(apply_rescale(np.array([padding]), first)[0]) if padding is not None else float(stack.min())
    # target voxel -> source voxel. Target slice k lies in the plane of source slice k, so the slice index
    # maps to itself: set exactly, or float noise of 1e-13 puts the first and last slices "outside" the
    # source (scipy's constant mode) and fills them with padding.
    index_map = np.linalg.inv(source_lps) @ target_lps
    index_map[2] = [0.0, 0.0, 1.0, 0.0]
    array = affine_transform(
        stack, index_map[:3, :3], index_map[:3, 3], output_shape=shape, order=1, mode="constant", cval=fill
    ).astype(np.float32)
    if np.all(stack == np.round(stack)):
        array = np.round(array)
    tilt = math.degrees(math.acos(min(1.0, abs(slice_distance) / float(np.linalg.norm(step)))))
    header_tilt = first.get("GantryDetectorTilt")
    metadata: dict[str, Any] = {"gantry_tilt_deg": round(tilt, 4), "resampled": "gantry_tilt"}
    if header_tilt not in (None, ""):
        metadata["gantry_detector_tilt_deg"] = float(header_tilt)
    return _Grid(_compact_dtype(array), target_ras), order, metadata


def _frame_diffusion_table(
    diffusion: Sequence[tuple[float, tuple[float, float, float]] | None],
) -> tuple[tuple[float, ...], tuple[tuple[float, float, float], ...], str]:
    """Per-frame (b-value, LPS gradient) -> (b-values, RAS b-vectors, frame axis).

    The frames are diffusion directions when the b-values or the gradients vary (an fMRI run whose
    headers all say b = 0 is a time series, as dcm2niix also writes no .bval for it); frames without a
    diffusion header then count as b = 0.
    """
    if all(d is None for d in diffusion):
        return (), (), "time"
    b_values = tuple(d[0] if d is not None else 0.0 for d in diffusion)
    b_vectors = tuple(_lps_to_ras_vector(d[1]) if d is not None else (0.0, 0.0, 0.0) for d in diffusion)
    if len(set(b_values)) > 1 or len(set(b_vectors)) > 1:
        return b_values, b_vectors, "diffusion"
    return (), (), "time"


def _lps_to_ras_vector(vector: Iterable[float]) -> tuple[float, float, float]:
    x, y, z = (float(v) for v in vector)
    return (-x + 0.0, -y + 0.0, z + 0.0)  # + 0.0: no negative zeros in the output


# -------------------------------------------------------------------- diffusion


def _unit(vector: Iterable[float]) -> tuple[float, float, float] | None:
    values = np.asarray(list(vector), dtype=float)
    if values.shape != (3,) or not np.all(np.isfinite(values)):
        return None
    norm = float(np.linalg.norm(values))
    if norm < 1e-6:
        return (0.0, 0.0, 0.0)
    unit = values / norm
    return (float(unit[0]), float(unit[1]), float(unit[2]))


def _diffusion(ds: Dataset) -> tuple[float, tuple[float, float, float]] | None:
    """b-value and unit gradient (LPS patient frame) of a single-frame image, from the standard attributes
    (DiffusionBValue / DiffusionGradientOrientation, also in an MR Diffusion Sequence), the Siemens CSA
    header, or the UIH private block (whose gradient is in the image frame)."""
    item = ds
    if "MRDiffusionSequence" in ds and ds.MRDiffusionSequence:
        item = ds.MRDiffusionSequence[0]
    if item.get("DiffusionBValue") is not None:
        b_value = float(item.DiffusionBValue)
        gradient = item.get("DiffusionGradientOrientation")
        if gradient is None and item.get("DiffusionGradientDirectionSequence"):
            gradient = item.DiffusionGradientDirectionSequence[0].get("DiffusionGradientOrientation")
        unit = _unit(gradient) if gradient is not None else (0.0, 0.0, 0.0)
        return (b_value, unit or (0.0, 0.0, 0.0))
    if str(ds.get("Manufacturer", "")).upper().startswith("SIEMENS"):
        csa = _csa(ds)
        if csa is not None:
            try:
                csa_b_value = csareader.get_scalar(csa, "B_value")
            except (KeyError, IndexError, csareader.CSAError):
                csa_b_value = None
            if csa_b_value is not None:
                b_value = float(csa_b_value)
                try:
                    gradient = csareader.get_vector(csa, "DiffusionGradientDirection", 3)
                except (KeyError, IndexError, ValueError, csareader.CSAError):
                    gradient = None
                unit = _unit(gradient) if gradient is not None else (0.0, 0.0, 0.0)
                return (b_value, unit or (0.0, 0.0, 0.0))
    block = _uih_block(ds)
    if block is not None:
        try:
            b_value = float(block[_UIH_B_VALUE].value)
        except KeyError:
            return None
        try:
            image_frame = np.asarray(block[_UIH_GRADIENT].value, dtype=float).reshape(3)
        except (KeyError, ValueError):
            return (b_value, (0.0, 0.0, 0.0))
        row, column = np.reshape(np.asarray(ds.ImageOrientationPatient, dtype=float), (2, 3))
        patient = image_frame[0] * row + image_frame[1] * column + image_frame[2] * np.cross(row, column)
        return (b_value, _unit(patient) or (0.0, 0.0, 0.0))
    return None


# -------------------------------------------------------------- mosaics and grids


def _csa(ds: Dataset) -> dict[str, Any] | None:
    try:
        return csareader.get_csa_header(ds, "image")
    except (csareader.CSAError, KeyError, ValueError, TypeError):
        return None


def _uih_block(ds: Dataset) -> Any | None:
    if not str(ds.get("Manufacturer", "")).upper().startswith("UI"):
        return None
    try:
        return ds.private_block(0x0065, _UIH_CREATOR)
    except KeyError:
        return None


def _mosaic_kind(ds: Dataset) -> str | None:
    """``"siemens"`` for a Siemens mosaic (ImageType MOSAIC and a CSA image count), ``"uih"`` for a UIH grid
    ((0065,1050) images in grid, one position per slice in (0065,1051)), else None."""
    image_type = {str(v).upper() for v in ds.get("ImageType", [])}
    if "MOSAIC" in image_type and str(ds.get("Manufacturer", "")).upper().startswith("SIEMENS"):
        csa = _csa(ds)
        if csa is not None and csareader.get_n_mosaic(csa):
            return "siemens"
        if (0x0019, 0x100A) in ds:
            return "siemens"
    block = _uih_block(ds)
    if block is not None and _UIH_IMAGES_IN_GRID in block and _UIH_FRAME_SEQUENCE in block:
        return "uih"
    return None


def _tile_slice(ds: Dataset, pixels: np.ndarray, position: np.ndarray, rows: int, columns: int) -> Dataset:
    """A single-frame dataset for one tile: the mosaic's header with its own size, position and pixels."""
    tile = Dataset()
    for element in ds:
        if element.tag.group in (0x0029, 0x0065) or element.keyword in ("PixelData",):
            continue
        tile.add(copy.copy(element))
    tile.file_meta = FileMetaDataset(ds.file_meta)
    tile.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    tile.Rows, tile.Columns = rows, columns
    tile.ImagePositionPatient = [float(v) for v in position]
    tile.PixelData = np.ascontiguousarray(pixels).tobytes()
    tile["PixelData"].VR = "OW" if ds.BitsAllocated > 8 else "OB"
    return tile


def _mosaic_slices(ds: Dataset, kind: str) -> list[_Slice]:
    """Cut one mosaic/grid file into its slices, each at its own patient position.

    Siemens (nibabel's MosaicWrapper reads the CSA header): a square grid of ``ceil(sqrt(n))`` tiles;
    ImagePositionPatient is that of the whole mosaic's corner, corrected to the first slice, and slice k
    lies ``k * SpacingBetweenSlices`` along the CSA slice normal. UIH: ``ceil(sqrt(n))`` columns and as many
    rows as needed; every slice's position is in (0065,1051), in tile order.
    """
    stored = ds.pixel_array
    if kind == "siemens":
        csa = _csa(ds)
        if csa is None or csareader.get_slice_normal(csa) is None:
            # without the CSA slice normal the slices' direction is a guess (the orientation's cross
            # product is wrong for descending acquisitions: measured 141 mm off on a real DWI mosaic)
            raise NonVolumetricSeriesError(
                "unsupported", f"{ds.SOPInstanceUID}: Siemens mosaic without its CSA image header (slice direction)"
            )
        wrapper = MosaicWrapper(ds, csa_header=csa, n_mosaic=_siemens_images_in_mosaic(ds))
        n_slices, n_cols = int(wrapper.n_mosaic), int(wrapper.mosaic_size)
        n_rows = n_cols
        origin = np.asarray(wrapper.image_position, dtype=float)
        spacing = float(wrapper.voxel_sizes[2])
        positions = [origin + k * spacing * np.asarray(wrapper.slice_normal, dtype=float) for k in range(n_slices)]
    else:
        block = _uih_block(ds)
        assert block is not None
        n_slices = int(float(block[_UIH_IMAGES_IN_GRID].value))
        n_cols = math.ceil(math.sqrt(n_slices))
        n_rows = math.ceil(n_slices / n_cols)
        items = list(block[_UIH_FRAME_SEQUENCE].value)
        if len(items) != n_slices or any("ImagePositionPatient" not in item for item in items):
            raise NonVolumetricSeriesError(
                "unsupported", f"UIH grid of {n_slices} images has {len(items)} per-slice positions"
            )
        positions = [np.asarray(item.ImagePositionPatient, dtype=float) for item in items]
    if n_slices < 1 or ds.Rows % n_rows or ds.Columns % n_cols:
        raise NonVolumetricSeriesError(
            "unsupported", f"{ds.Rows}x{ds.Columns} mosaic does not divide into {n_rows}x{n_cols} tiles"
        )
    rows, columns = ds.Rows // n_rows, ds.Columns // n_cols
    diffusion = _diffusion(ds)
    uid = str(ds.SOPInstanceUID)
    order = _order_key(ds)
    slices = []
    for k in range(n_slices):
        r, c = divmod(k, n_cols)
        pixels = stored[r * rows : (r + 1) * rows, c * columns : (c + 1) * columns]
        slices.append(_Slice(_tile_slice(ds, pixels, positions[k], rows, columns), uid, order, diffusion))
    return slices


def _siemens_images_in_mosaic(ds: Dataset) -> int | None:
    """NumberOfImagesInMosaic: the CSA header's, else the private (0019,100A) some anonymisers keep alone."""
    csa = _csa(ds)
    if csa is not None and csareader.get_n_mosaic(csa):
        return int(csareader.get_n_mosaic(csa))
    element = ds.get((0x0019, 0x100A))
    if element is None:
        return None
    value = element.value
    if isinstance(value, bytes):
        return int(np.frombuffer(value[:2], dtype="<u2")[0])
    return int(value)


# ------------------------------------------------------------------ enhanced (MF)


def _is_enhanced(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def _frame_groups(ds: Dataset) -> list[Dataset]:
    return list(ds.get("PerFrameFunctionalGroupsSequence", []))


def _frame_type(group: Dataset) -> tuple[str, ...]:
    for item in group:
        if item.VR == "SQ" and item.keyword.endswith("FrameTypeSequence") and item.value:
            return tuple(str(v) for v in item.value[0].get("FrameType", []))
    return ()


def _frame_type_key(ds: Dataset, index: int) -> str:
    """Frame Type value 4 of one frame: what the frame *is* (M, P, FIELD_MAP...)."""
    groups = _frame_groups(ds)
    ftype = _frame_type(groups[index]) if groups else ()
    if not ftype and "SharedFunctionalGroupsSequence" in ds:
        ftype = _frame_type(ds.SharedFunctionalGroupsSequence[0])
    return ftype[3].upper() if len(ftype) > 3 else ""


def _functional_item(ds: Dataset, index: int, keyword: str) -> Dataset | None:
    """First item of functional group ``keyword`` for frame ``index``: per-frame first, then shared."""
    groups = _frame_groups(ds)
    for group in ([groups[index]] if groups else []) + list(ds.get("SharedFunctionalGroupsSequence", [])):
        value = group.get(keyword)
        if value:
            return value[0]
    return None


def _frame_position(ds: Dataset, index: int) -> tuple[float, ...] | None:
    item = _functional_item(ds, index, "PlanePositionSequence")
    if item is None or "ImagePositionPatient" not in item:
        return None
    return tuple(round(float(v) / _POSITION_TOL_MM) * _POSITION_TOL_MM for v in item.ImagePositionPatient)


def _frame_echo_time(ds: Dataset, index: int) -> float | None:
    item = _functional_item(ds, index, "MREchoSequence")
    value = item.get("EffectiveEchoTime") if item is not None else None
    return float(value) if value not in (None, "") else None


def _frame_diffusion(ds: Dataset, index: int) -> tuple[float, tuple[float, float, float]] | None:
    item = _functional_item(ds, index, "MRDiffusionSequence")
    if item is None or item.get("DiffusionBValue") is None:
        return None
    gradient = None
    if item.get("DiffusionGradientDirectionSequence"):
        gradient = item.DiffusionGradientDirectionSequence[0].get("DiffusionGradientOrientation")
    unit = _unit(gradient) if gradient is not None else None
    return (float(item.DiffusionBValue), unit or (0.0, 0.0, 0.0))


def _frame_order(ds: Dataset, index: int) -> tuple[Any, ...]:
    """Order of frames at one position: the Dimension Index Values (as dcm2niix sorts), then the frame number."""
    content = _functional_item(ds, index, "FrameContentSequence")
    raw = content.get("DimensionIndexValues") if content is not None else None
    values = () if raw is None else tuple(int(v) for v in (raw if isinstance(raw, Sequence | MultiValue) else [raw]))
    return (*values, index)


def _drop_private_dimension_indices(ds: Dataset) -> None:
    """Remove private Dimension Index Pointers (in place).

    highdicom 0.28 looks every Dimension Index Pointer up in the *public* data
    dictionary while building its frame table and raises ``KeyError`` on the
    private ones Philips writes (e.g. (2005,106E) "Private Scanning
    Sequence"). Geometry never depends on them, so they are removed together
    with their column in every frame's Dimension Index Values.
    """
    if "DimensionIndexSequence" not in ds:
        return
    keep = [n for n, item in enumerate(ds.DimensionIndexSequence) if not item.DimensionIndexPointer.is_private]
    if len(keep) == len(ds.DimensionIndexSequence):
        return
    ds.DimensionIndexSequence = DicomSequence([ds.DimensionIndexSequence[n] for n in keep])
    for group in _frame_groups(ds):
        for content in group.get("FrameContentSequence", []):
            if "DimensionIndexValues" in content:
                values = list(content.DimensionIndexValues)
                content.DimensionIndexValues = [values[n] for n in keep]


def _frame_subset(ds: Dataset, frames: Sequence[int]) -> Dataset:
    """A new enhanced dataset holding only ``frames`` (0-based), uncompressed.

    Needed because highdicom builds a volume from *all* frames of an image and
    refuses duplicate positions, while one Philips field-map file stores the
    magnitude and field-map frames at the same positions, and a 4-D enhanced
    file every time point's frames at the same positions.
    """
    stored = ds.pixel_array
    if stored.ndim == 2:
        stored = stored[np.newaxis]
    sub = Dataset()
    for element in ds:
        if element.keyword not in ("PixelData", "PerFrameFunctionalGroupsSequence", "NumberOfFrames"):
            sub.add(copy.copy(element))
    sub.file_meta = FileMetaDataset(ds.file_meta)
    sub.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sub.PerFrameFunctionalGroupsSequence = DicomSequence([ds.PerFrameFunctionalGroupsSequence[n] for n in frames])
    sub.NumberOfFrames = len(frames)
    sub.PixelData = np.ascontiguousarray(stored[list(frames)]).tobytes()
    sub["PixelData"].VR = "OW" if ds.BitsAllocated > 8 else "OB"
    return sub


@dataclass(frozen=True, eq=False)
class _EnhancedFrameVolume:
    label: str
    volume: hd.Volume
    diffusion: tuple[float, tuple[float, float, float]] | None
    echo_time: float | None


def _enhanced_volumes(ds: Dataset) -> list[_EnhancedFrameVolume]:
    """Volumes of one enhanced file: one per Frame Type (value 4) and echo, and within those one per
    repetition of the positions (time point or diffusion direction), in Dimension Index order."""
    _drop_private_dimension_indices(ds)
    n_frames = int(ds.get("NumberOfFrames", 1))
    by_type: dict[str, dict[float | None, list[int]]] = defaultdict(lambda: defaultdict(list))
    for n in range(n_frames):
        by_type[_frame_type_key(ds, n)][_frame_echo_time(ds, n)].append(n)
    groups = []
    for key, by_echo in sorted(by_type.items()):
        label = _FRAME_TYPE_LABELS.get(key, key.lower()) if len(by_type) > 1 else ""
        if len(by_echo) > 1 and None in by_echo:
            raise NonVolumetricSeriesError("unsupported", f"{ds.SOPInstanceUID}: some frames have no echo time")
        for echo_index, (echo, frames) in enumerate(sorted(by_echo.items(), key=lambda item: item[0] or 0.0)):
            # several echoes of one image type (multi-echo): one volume each, e1, e2... as dcm2niix
            echo_label = f"e{echo_index + 1}" if len(by_echo) > 1 else ""
            groups.append(("_".join(part for part in (label, echo_label) if part), key, echo, frames))
    results = []
    for label, key, echo, frames in groups:
        at_position: dict[tuple[float, ...] | None, list[int]] = defaultdict(list)
        for n in frames:
            at_position[_frame_position(ds, n)].append(n)
        counts = {len(v) for v in at_position.values()}
        if len(counts) > 1:
            raise NonVolumetricSeriesError(
                "duplicate_positions",
                f"{ds.SOPInstanceUID}: positions repeat unevenly ({sorted(counts)} frames per position)",
            )
        repeats = counts.pop()
        for group in at_position.values():
            group.sort(key=lambda n: _frame_order(ds, n))
        for t in range(repeats):
            subset = sorted((group[t] for group in at_position.values()), key=lambda n: _frame_order(ds, n))
            if len(subset) == 1:
                raise NonVolumetricSeriesError(
                    "single_slice", f"{ds.SOPInstanceUID}: only one frame of type {key or '?'}"
                )
            source = ds if len(subset) == n_frames else _frame_subset(ds, subset)
            try:
                image = hd.Image.from_dataset(source, copy=False)
                volume = image.get_volume(dtype=np.float32, apply_real_world_transform=False, rtol=_SPACING_RTOL)
            except RuntimeError as exc:  # "Multiple frames found at one or more plane positions"
                raise NonVolumetricSeriesError("duplicate_positions", f"{ds.SOPInstanceUID}: {exc}") from exc
            except ValueError as exc:  # irregular spacing, missing positions, no geometry
                reason = "missing_slices" if "spac" in str(exc).lower() else "unsupported"
                raise NonVolumetricSeriesError(reason, f"{ds.SOPInstanceUID}: {exc}") from exc
            results.append(_EnhancedFrameVolume(label, volume, _frame_diffusion(ds, subset[0]), echo))
    return results


def _temporal_sort_key(ds: Dataset) -> tuple[str, int]:
    return (str(ds.get("AcquisitionDateTime", "")), int(ds.get("InstanceNumber", 0) or 0))


def _reconstruct_enhanced(datasets: list[Dataset]) -> list[SeriesVolume]:
    """Each file -> volume(s); repeated positions (in one file or across files) -> 4-D.

    A multi-file enhanced series (Siemens XA fMRI writes one file per volume)
    is stacked along axis 3 in acquisition order, after the repetitions inside
    each file. Files whose geometry differs are not a time series and are
    flagged rather than resampled.
    """
    uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(uids) > 1:
        raise NonVolumetricSeriesError("mixed_series", f"{len(uids)} SeriesInstanceUIDs")
    ordered = sorted(datasets, key=_temporal_sort_key)
    per_label: dict[str, list[tuple[str, _EnhancedFrameVolume]]] = defaultdict(list)
    for ds in ordered:
        for item in _enhanced_volumes(ds):
            per_label[item.label].append((str(ds.SOPInstanceUID), item))
    results = []
    for label, items in per_label.items():
        first = items[0][1].volume
        for _, other in items[1:]:
            if other.volume.spatial_shape != first.spatial_shape or not first.geometry_equal(other.volume, tol=1e-3):
                reason = "mixed_orientation"
                if np.allclose(first.direction, other.volume.direction, atol=_ORIENTATION_TOL):
                    reason = "mixed_geometry"
                raise NonVolumetricSeriesError(reason, "enhanced files of the series have different grids")
        file_uids = list(dict.fromkeys(uid for uid, _ in items))
        series_volume = _to_series_volume(first, label=label, uids=file_uids, series_uid=next(iter(uids)))
        metadata: dict[str, Any] = {}
        echo_time = items[0][1].echo_time
        if echo_time is not None and label.split("_")[-1].startswith("e") and label.split("_")[-1][1:].isdigit():
            metadata["echo_time_ms"] = echo_time
        if len(items) > 1:
            stacked = np.stack([item.volume.permute_spatial_axes([2, 1, 0]).array for _, item in items], axis=-1)
            b_values, b_vectors, metadata["frame_axis"] = _frame_diffusion_table([item.diffusion for _, item in items])
            series_volume = SeriesVolume(
                array=_compact_dtype(stacked),
                affine=series_volume.affine,
                label=label,
                source_sop_instance_uids=series_volume.source_sop_instance_uids,
                series_instance_uid=series_volume.series_instance_uid,
                b_values=b_values,
                b_vectors=b_vectors,
                metadata=metadata,
            )
        elif metadata:
            series_volume = SeriesVolume(
                array=series_volume.array,
                affine=series_volume.affine,
                label=label,
                source_sop_instance_uids=series_volume.source_sop_instance_uids,
                series_instance_uid=series_volume.series_instance_uid,
                metadata=metadata,
            )
        results.append(series_volume)
    return results
