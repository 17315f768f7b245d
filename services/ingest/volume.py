"""DICOM series -> 3-D (or 4-D) volume with correct world geometry.

This module is deliberately thin glue around the field's libraries:

* ``highdicom.get_volume_from_series`` sorts single-frame instances along the
  slice normal, checks that the spacing is regular and applies the modality
  (Rescale Slope/Intercept) transform;
* ``highdicom.Image.get_volume`` does the same for Enhanced multi-frame
  objects, reading geometry from the Shared/Per-Frame Functional Groups;
* ``highdicom.Volume`` owns the affine (LPS internally) and converts it to RAS;
* ``nibabel`` writes NIfTI.

What is written here is what those libraries do *not* do for an ingest
service: decide up front whether a series should become a volume at all, and
say why not with a machine-readable reason code (:class:`NonVolumetricSeriesError`)
instead of silently producing a wrong volume; split an enhanced object that
multiplexes several image types (Philips B0 field map = magnitude + field
map); stack several enhanced files of one series into a 4-D time series; and
work around one highdicom 0.28 limitation (private Dimension Index Pointers,
see :func:`_drop_private_dimension_indices`).

Conventions of the returned :class:`SeriesVolume`:

* array axes are ``(column, row, slice[, time])`` - the NIfTI/ITK order
  ``(i, j, k[, t])`` where ``i`` walks along a DICOM row - so that
  ``affine @ [i, j, k, 1]`` is the RAS world position (mm) of a voxel centre;
* slice spacing always comes from ImagePositionPatient (via highdicom), never
  from SliceThickness, which differs whenever slices have gaps or overlap.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
from highdicom.spatial import get_series_volume_positions
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian

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


class NonVolumetricSeriesError(ValueError):
    """The files cannot be honestly represented as one regular voxel grid.

    ``reason_code`` is stable and machine-readable so the ingest service can
    route or report the series (``secondary_capture``, ``localizer``,
    ``single_slice``, ``mixed_orientation``, ``mixed_geometry``,
    ``mixed_series``, ``missing_slices``, ``duplicate_positions``,
    ``non_perpendicular_stack``, ``no_pixel_data``, ``undecodable_pixel_data``, ``unsupported``);
    ``message`` is for humans.
    """

    def __init__(self, reason_code: str, message: str) -> None:
        super().__init__(f"{reason_code}: {message}")
        self.reason_code = reason_code
        self.message = message


@dataclass(frozen=True, eq=False)
class SeriesVolume:
    """One voxel grid reconstructed from a DICOM series.

    Attributes:
        array: voxel values after Rescale Slope/Intercept, axes
            ``(column, row, slice[, time])``; ``int16`` when that is lossless,
            else ``float32``.
        affine: 4x4 voxel-index -> RAS world (mm) matrix, as NIfTI expects
            (DICOM's LPS is converted by highdicom).
        label: which image type of the series this is when a series holds
            several volumes (``"magnitude"``, ``"fieldmap"``, ...); ``""`` when
            the series is a single volume.
        source_sop_instance_uids: for single-frame series one UID per slice,
            in the order of axis 2; for enhanced multi-frame series one UID per
            source file, in the order of axis 3 (time) when there are several.
        series_instance_uid: SeriesInstanceUID of the sources.
    """

    array: np.ndarray
    affine: np.ndarray
    label: str = ""
    source_sop_instance_uids: tuple[str, ...] = ()
    series_instance_uid: str = ""

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) along array axes 0, 1, 2, from the affine columns."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(norms[0]), float(norms[1]), float(norms[2]))

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

    Returns one :class:`SeriesVolume` per image type in the series (normally
    one). Raises :class:`NonVolumetricSeriesError` whenever the files do not
    form a regular grid, rather than guessing.
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
    return [_reconstruct_single_frame(datasets)]


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


def _explain_irregular_stack(datasets: Sequence[Dataset]) -> NonVolumetricSeriesError:
    """Turn highdicom's "not a regular volume" into a specific reason code."""
    row, column = np.reshape(np.asarray(datasets[0].ImageOrientationPatient, dtype=float), (2, 3))
    normal = np.cross(row, column)
    positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=float) for ds in datasets])
    along = positions @ normal
    order = np.argsort(along)
    steps = np.diff(along[order])
    if np.any(np.isclose(steps, 0.0, atol=1e-3)):
        return NonVolumetricSeriesError(
            "duplicate_positions",
            "several instances share a slice position (multi-echo/time series or duplicates)",
        )
    in_plane = positions[order] - np.outer(along[order], normal)
    if np.max(np.linalg.norm(in_plane - in_plane[0], axis=1)) > 1e-2 * max(float(np.ptp(along)), 1.0):
        return NonVolumetricSeriesError(
            "non_perpendicular_stack", "slices are not stacked along their normal (gantry tilt / shear)"
        )
    return NonVolumetricSeriesError(
        "missing_slices",
        f"irregular slice spacing along the normal: steps {np.round(steps, 3).tolist()} mm",
    )


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


def _reconstruct_single_frame(datasets: list[Dataset]) -> SeriesVolume:
    if len(datasets) == 1:
        raise NonVolumetricSeriesError("single_slice", "a single 2-D image is not a volume")
    _check_single_frame_geometry(datasets)
    kwargs: dict[str, Any] = {"rtol": _SPACING_RTOL, "orientation_tol": _ORIENTATION_TOL}
    spacing, positions = get_series_volume_positions(datasets, **kwargs)
    if spacing is None or positions is None:
        raise _explain_irregular_stack(datasets)
    ordered = sorted(range(len(datasets)), key=lambda n: positions[n])
    try:
        volume = hd.get_volume_from_series(datasets, dtype=np.float32, apply_real_world_transform=False, **kwargs)
    except ValueError as exc:  # any inconsistency our checks did not anticipate
        raise NonVolumetricSeriesError("unsupported", f"highdicom refused the series: {exc}") from exc
    return _to_series_volume(
        volume,
        label="",
        uids=[str(datasets[n].SOPInstanceUID) for n in ordered],
        series_uid=str(datasets[0].SeriesInstanceUID),
    )


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
    magnitude and field-map frames at the same positions.
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


def _enhanced_volumes(ds: Dataset) -> list[tuple[str, hd.Volume]]:
    """Volumes of one enhanced file, one per Frame Type (value 4)."""
    _drop_private_dimension_indices(ds)
    n_frames = int(ds.get("NumberOfFrames", 1))
    by_type: dict[str, list[int]] = defaultdict(list)
    for n in range(n_frames):
        by_type[_frame_type_key(ds, n)].append(n)
    results = []
    for key, frames in by_type.items():
        if len(frames) == 1:
            raise NonVolumetricSeriesError("single_slice", f"{ds.SOPInstanceUID}: only one frame of type {key or '?'}")
        source = ds if len(by_type) == 1 else _frame_subset(ds, frames)
        try:
            image = hd.Image.from_dataset(source, copy=False)
            volume = image.get_volume(dtype=np.float32, apply_real_world_transform=False, rtol=_SPACING_RTOL)
        except RuntimeError as exc:  # "Multiple frames found at one or more plane positions"
            raise NonVolumetricSeriesError("duplicate_positions", f"{ds.SOPInstanceUID}: {exc}") from exc
        except ValueError as exc:  # irregular spacing, missing positions, no geometry
            reason = "missing_slices" if "spac" in str(exc).lower() else "unsupported"
            raise NonVolumetricSeriesError(reason, f"{ds.SOPInstanceUID}: {exc}") from exc
        label = _FRAME_TYPE_LABELS.get(key, key.lower()) if len(by_type) > 1 else ""
        results.append((label, volume))
    return results


def _temporal_sort_key(ds: Dataset) -> tuple[str, int]:
    return (str(ds.get("AcquisitionDateTime", "")), int(ds.get("InstanceNumber", 0) or 0))


def _reconstruct_enhanced(datasets: list[Dataset]) -> list[SeriesVolume]:
    """Each file -> volume(s); several files with one geometry -> 4-D (time).

    A multi-file enhanced series (Siemens XA fMRI writes one file per volume)
    is stacked along axis 3 in acquisition order. Files whose geometry
    differs are not a time series and are flagged rather than resampled.
    """
    uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(uids) > 1:
        raise NonVolumetricSeriesError("mixed_series", f"{len(uids)} SeriesInstanceUIDs")
    ordered = sorted(datasets, key=_temporal_sort_key)
    per_label: dict[str, list[tuple[str, hd.Volume]]] = defaultdict(list)
    for ds in ordered:
        for label, volume in _enhanced_volumes(ds):
            per_label[label].append((str(ds.SOPInstanceUID), volume))
    results = []
    for label, items in per_label.items():
        first = items[0][1]
        for _, other in items[1:]:
            if other.spatial_shape != first.spatial_shape or not first.geometry_equal(other, tol=1e-3):
                reason = "mixed_orientation"
                if np.allclose(first.direction, other.direction, atol=_ORIENTATION_TOL):
                    reason = "mixed_geometry"
                raise NonVolumetricSeriesError(reason, "enhanced files of the series have different grids")
        series_volume = _to_series_volume(
            first, label=label, uids=[uid for uid, _ in items], series_uid=next(iter(uids))
        )
        if len(items) > 1:
            stacked = np.stack([v.permute_spatial_axes([2, 1, 0]).array for _, v in items], axis=-1)
            series_volume = SeriesVolume(
                array=_compact_dtype(stacked),
                affine=series_volume.affine,
                label=label,
                source_sop_instance_uids=series_volume.source_sop_instance_uids,
                series_instance_uid=series_volume.series_instance_uid,
            )
        results.append(series_volume)
    return results
