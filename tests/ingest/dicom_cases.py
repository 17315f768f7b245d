"""DICOM series that scanners write and the bundled real data lacks, built from real headers or real pixels.

Each builder writes files into a folder and returns them; the reconstruction tests run both voxelflow and
dcm2niix (the reference) on the same folder. Headers come from real files wherever one exists (nibabel's
Siemens mosaic DWI test files carry a genuine CSA header; the TCIA, LIDC and TotalSegmentator series are real
scanner output), and pixel values from a known volume, so a wrong tile order, flip or slice order shows as a
voxel mismatch rather than hiding in symmetric data.
"""

from __future__ import annotations

import copy
import gzip
import io
import math
from collections.abc import Sequence
from pathlib import Path

import nibabel
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

NIBABEL_DICOM = Path(nibabel.__file__).parent / "nicom" / "tests" / "data"
#: real Siemens Trio mosaic DWI headers (b=0 and b=1000, one series) shipped with nibabel; their pixels are zeros
SIEMENS_DWI_MOSAICS = ("siemens_dwi_0.dcm.gz", "siemens_dwi_1000.dcm.gz")


def pattern_volume(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """Asymmetric uint16 test volume ``(column, row, slice)``: every axis flip or swap changes values."""
    i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    values = 40 + (7 * i + 3 * j * j // 5 + 37 * k + 11 * seed) % 3000 + (i > j) * 500
    return values.astype(np.uint16)


def _write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _tile(volume: np.ndarray, n_cols: int, n_rows: int) -> np.ndarray:
    """(column, row, slice) volume -> one 2-D mosaic (rows, columns), slices left to right, then down."""
    cols, rows, n = volume.shape
    mosaic = np.zeros((n_rows * rows, n_cols * cols), dtype=volume.dtype)
    for k in range(n):
        r, c = divmod(k, n_cols)
        mosaic[r * rows : (r + 1) * rows, c * cols : (c + 1) * cols] = volume[:, :, k].T
    return mosaic


def siemens_mosaic_dwi(folder: Path) -> tuple[list[Path], list[np.ndarray]]:
    """Two real Siemens mosaic headers (CSA: 48 slices of 128x128 in a 7x7 grid, b=0 and b=1000) with the
    tiles of known volumes as pixels, plus a repeat of the b=1000 one. Returns the files and the volumes
    written (column, row, slice)."""
    folder.mkdir(parents=True, exist_ok=True)
    files, volumes = [], []
    for n, name in enumerate(SIEMENS_DWI_MOSAICS):
        ds = pydicom.dcmread(io.BytesIO(gzip.decompress((NIBABEL_DICOM / name).read_bytes())))
        n_slices = int(ds[0x0019, 0x100A].value)
        grid = math.ceil(math.sqrt(n_slices))
        volume = pattern_volume((ds.Columns // grid, ds.Rows // grid, n_slices), seed=n)
        ds.PixelData = _tile(volume, grid, grid).tobytes()
        files.append(_write(ds, folder / f"mosaic{n}.dcm"))
        volumes.append(volume)
    # a third volume repeating the b=1000 direction (its header, own pixels): dcm2niix writes no .bval/.bvec
    # for a two-volume series, and repeated directions are common in real protocols
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = ds.AcquisitionNumber = 3
    volume = pattern_volume(volumes[-1].shape, seed=2)
    ds.PixelData = _tile(volume, grid, grid).tobytes()
    files.append(_write(ds, folder / "mosaic2.dcm"))
    volumes.append(volume)
    return files, volumes


def uih_grid_series(
    folder: Path,
    volumes: Sequence[np.ndarray],
    *,
    spacing: tuple[float, float, float] = (2.0, 2.0, 3.0),
    b_values: Sequence[float] | None = None,
    b_vectors: Sequence[Sequence[float]] | None = None,
) -> list[Path]:
    """United Imaging (UIH) "VFRAME" grid files, one per volume, laid out as the uMR 770 writes them (checked
    against the dcm_qa_uih DTI files): Manufacturer ``UIH``, ImageType ``…\\VFRAME``, (0065,1050) the number
    of images in the grid, ``ceil(sqrt(n))`` columns and only as many rows as needed, no top-level
    ImagePositionPatient but one per slice in the private sequence (0065,1051), in tile order; b-value in
    (0065,1009) and gradient direction in (0065,1037) for diffusion."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    cols, rows, n_slices = volumes[0].shape
    n_cols = math.ceil(math.sqrt(n_slices))
    n_rows = math.ceil(n_slices / n_cols)
    # an oblique axial plane, as the real files have (rotated ~1.7 degrees about two axes)
    row_dir = np.array([0.999113142, 0.0305822305, 0.0289414488])
    col_dir = np.array([-0.0305694081, 0.999532282, 0.0])
    col_dir -= row_dir * (row_dir @ col_dir)
    col_dir /= np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)
    origin = np.array([-114.44, -112.32, -6.39])
    files = []
    for t, volume in enumerate(volumes):
        ds = _base_mr(study, series, frame_of_reference, manufacturer="UIH")
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "VFRAME"]
        ds.SeriesDescription = "dti_tra_grid"
        ds.InstanceNumber = t + 1
        ds.AcquisitionNumber = t + 1
        ds.ImageOrientationPatient = [*map(float, row_dir.round(9)), *map(float, col_dir.round(9))]
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SliceThickness = spacing[2]
        ds.SpacingBetweenSlices = spacing[2]
        ds.Rows, ds.Columns = n_rows * rows, n_cols * cols
        ds.PixelData = _tile(volume, n_cols, n_rows).tobytes()
        block = ds.private_block(0x0065, "Image Private Header", create=True)
        block.add_new(0x50, "DS", str(n_slices))
        items = []
        for k in range(n_slices):
            item = Dataset()
            item.ImagePositionPatient = [round(float(v), 6) for v in origin + k * spacing[2] * normal]
            items.append(item)
        block.add_new(0x51, "SQ", DicomSequence(items))
        if b_values is not None and b_vectors is not None:
            block.add_new(0x09, "FD", float(b_values[t]))
            block.add_new(0x37, "FD", [float(v) for v in b_vectors[t]])
        files.append(_write(ds, folder / f"{t + 1:08d}.dcm"))
    return files


def _base_mr(study: str, series: str, frame_of_reference: str, *, manufacturer: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
    ds.Modality = "MR"
    ds.Manufacturer = manufacturer
    ds.PatientName, ds.PatientID = "Test^Volume", "vol-1"
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = "20240102"
    ds.SeriesNumber = 6
    ds.PatientPosition = "HFS"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    return ds


def repeat_series(
    files: Sequence[Path],
    folder: Path,
    n_repeats: int,
    *,
    kind: str,
    b_values: Sequence[float] | None = None,
    b_vectors: Sequence[Sequence[float]] | None = None,
    echo_times: Sequence[float] | None = None,
    position_major: bool = False,
) -> tuple[list[Path], list[np.ndarray]]:
    """A single-frame 4-D series from a real 3-D one: every slice written ``n_repeats`` times, at the same
    position, with its pixels changed per repeat. ``kind`` says what tells the repeats apart:

    * ``"fmri"``: TemporalPositionIdentifier, AcquisitionNumber, AcquisitionTime;
    * ``"dwi"``: standard DiffusionBValue / DiffusionGradientOrientation (0018,9087/9089);
    * ``"echo"``: EchoNumbers and EchoTime (multi-echo).

    InstanceNumber runs volume by volume (slice fastest) as Siemens and Philips number them, or slice by
    slice (repeat fastest) with ``position_major``, as some GE series do. Returns the files and each repeat's
    (row, column) pixel arrays per source slice (in InstanceNumber order), to check values against.
    """
    folder.mkdir(parents=True, exist_ok=True)
    # in the source's own InstanceNumber order, as a scanner numbers them (dcm2niix relies on it)
    sources = sorted((pydicom.dcmread(f) for f in files), key=lambda ds: int(ds.InstanceNumber))
    series = generate_uid()
    written: list[Path] = []
    pixels: list[list[np.ndarray]] = []
    n_slices = len(sources)
    for t in range(n_repeats):
        for s, src in enumerate(sources):
            ds = copy.deepcopy(src)
            ds.SeriesInstanceUID = series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            base = src.pixel_array.astype(np.int32)
            changed = np.clip(base + (t * 97) % 400 - 150 * (t % 2) + 50, 0, 2**15 - 1)
            ds.PixelData = changed.astype(src.pixel_array.dtype).tobytes()
            if t == 0:
                pixels.append([])
            pixels[s].append(changed)
            ds.InstanceNumber = (s * n_repeats + t + 1) if position_major else (t * n_slices + s + 1)
            if kind == "fmri":
                ds.TemporalPositionIdentifier = t + 1
                ds.NumberOfTemporalPositions = n_repeats
                ds.AcquisitionNumber = t + 1
                ds.AcquisitionTime = f"1200{t:02d}.{s:06d}"
            elif kind == "dwi":
                assert b_values is not None and b_vectors is not None
                ds.AcquisitionNumber = 1
                ds.DiffusionBValue = float(b_values[t])
                ds.DiffusionGradientOrientation = [float(v) for v in b_vectors[t]]
                ds.DiffusionDirectionality = "DIRECTIONAL" if b_values[t] > 0 else "NONE"
            elif kind == "echo":
                assert echo_times is not None
                ds.EchoNumbers = t + 1
                ds.EchoTime = float(echo_times[t])
                ds.AcquisitionNumber = 1
            else:
                raise ValueError(kind)
            written.append(_write(ds, folder / f"im{len(written):05d}.dcm"))
    return written, [np.stack(p) for p in pixels]


def enhanced_from_series(files: Sequence[Path], path: Path) -> Path:
    """One Enhanced (Legacy Converted) MR file holding a whole single-frame 4-D series, built by highdicom.

    highdicom's converter indexes frames by InstanceNumber only (and stores them in its own order); a
    scanner's enhanced 4-D file has a stack / in-stack position / temporal position dimension organisation
    (Philips' order, the last index slowest, which dcm2niix sorts by), so that is written over it from each
    frame's source instance (its TemporalPositionIdentifier and its rank along the slice normal).
    """
    import highdicom as hd

    datasets = sorted((pydicom.dcmread(f) for f in files), key=lambda ds: int(ds.InstanceNumber))
    row, column = np.reshape(np.asarray(datasets[0].ImageOrientationPatient, dtype=float), (2, 3))
    along = sorted(
        {round(float(np.asarray(ds.ImagePositionPatient, dtype=float) @ np.cross(row, column)), 3) for ds in datasets}
    )
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    repeat = {uid: n for n, uid in enumerate(sorted(by_uid, key=lambda uid: int(by_uid[uid].InstanceNumber)))}
    n_positions = len(along)
    source = {
        str(ds.SOPInstanceUID): (
            int(ds.get("TemporalPositionIdentifier") or repeat[str(ds.SOPInstanceUID)] // n_positions + 1),
            along.index(round(float(np.asarray(ds.ImagePositionPatient, dtype=float) @ np.cross(row, column)), 3)) + 1,
        )
        for ds in datasets
    }
    image = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy_datasets=datasets,
        series_instance_uid=generate_uid(),
        series_number=int(datasets[0].get("SeriesNumber", 1) or 1),
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    organisation = generate_uid()
    image.DimensionOrganizationSequence = DicomSequence([Dataset()])  # type: ignore[assignment]
    image.DimensionOrganizationSequence[0].DimensionOrganizationUID = organisation
    pointers = []
    for keyword in ("StackID", "InStackPositionNumber", "TemporalPositionIndex"):
        item = Dataset()
        item.DimensionOrganizationUID = organisation
        item.DimensionIndexPointer = pydicom.datadict.tag_for_keyword(keyword)
        item.FunctionalGroupPointer = pydicom.datadict.tag_for_keyword("FrameContentSequence")
        pointers.append(item)
    image.DimensionIndexSequence = DicomSequence(pointers)  # type: ignore[assignment]
    for group in image.PerFrameFunctionalGroupsSequence:
        temporal, in_stack = source[str(group.ConversionSourceAttributesSequence[0].ReferencedSOPInstanceUID)]
        content = group.FrameContentSequence[0]
        content.StackID = "1"
        content.InStackPositionNumber = in_stack
        content.TemporalPositionIndex = temporal
        content.DimensionIndexValues = [1, in_stack, temporal]
        original = by_uid[str(group.ConversionSourceAttributesSequence[0].ReferencedSOPInstanceUID)]
        if "DiffusionBValue" in original:  # diffusion moves into the per-frame MR Diffusion functional group
            diffusion = Dataset()
            diffusion.DiffusionBValue = original.DiffusionBValue
            diffusion.DiffusionDirectionality = original.DiffusionDirectionality
            direction = Dataset()
            direction.DiffusionGradientOrientation = original.DiffusionGradientOrientation
            diffusion.DiffusionGradientDirectionSequence = DicomSequence([direction])
            group.MRDiffusionSequence = DicomSequence([diffusion])
    # dcm2niix (1.0.20220720) honours Dimension Index Values only for the vendors that write this
    # organisation (Philips, as here); for others it reads the frames as stored and mixes the time points.
    image.Manufacturer = "Philips"
    image.save_as(path)
    return path


def tilted_ct_series(files: Sequence[Path], folder: Path, tilt_deg: float) -> list[Path]:
    """A real axial CT series re-labelled as acquired with gantry tilt: the image plane tilted by
    ``tilt_deg`` about the patient's left-right axis (ImageOrientationPatient's column direction
    ``(0, cos, sin)``) while the positions still advance along the table (z), and GantryDetectorTilt says
    so - the geometry a tilted CT gantry writes. Pixels are the real ones."""
    folder.mkdir(parents=True, exist_ok=True)
    angle = math.radians(tilt_deg)
    series = generate_uid()
    written = []
    for n, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, round(math.cos(angle), 8), round(math.sin(angle), 8)]
        ds.GantryDetectorTilt = -tilt_deg  # the sign dcm2niix estimates from this geometry
        written.append(_write(ds, folder / f"ct{n:03d}.dcm"))
    return written


def copy_series(files: Sequence[Path], folder: Path) -> list[Path]:
    """The files copied into their own folder (dcm2niix converts a folder), under a fresh SeriesInstanceUID."""
    folder.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    written = []
    for n, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series
        written.append(_write(ds, folder / f"im{n:04d}.dcm"))
    return written
