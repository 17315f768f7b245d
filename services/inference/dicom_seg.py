"""The label map as a DICOM Segmentation (highdicom) on the source series' own grid.

The mask lives on the NIfTI-style (i, j, k) grid with a RAS affine; the SEG must have one frame per source
image, on that image's rows and columns. Rather than trusting an axis order, every source image is placed
in *world* coordinates: its ImagePositionPatient and orientation (LPS) are mapped through the inverse affine
to voxel indices, which must be whole numbers and step along one mask axis per row/column; the frame is
then read out of the mask at those indices. A flipped, transposed or reversed slice order therefore lands
on the right slice, and a grid that does not match raises instead of writing a shifted segmentation.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
GRID_TOLERANCE = 0.01  # voxels


class GridMismatchError(ValueError):
    """A source image does not lie on the mask's voxel grid."""


@dataclass(frozen=True)
class AlgorithmInfo:
    """Provenance of one output, written into every DICOM object of a request (mapping in
    docs/inference-service.md): the model (name, version, registry URI), what it was trained on (dataset
    version) and with (code version, the training run's git SHA), and the request that produced it."""

    model_name: str
    model_version: str
    registry_uri: str
    request_id: str
    dataset_version: str = ""
    code_version: str = ""

    def parameters(self) -> dict[str, str]:
        """AlgorithmParameters (0066,0032): the provenance that has no attribute of its own."""
        values = {
            "registry_uri": self.registry_uri,
            "dataset_version": self.dataset_version,
            "code_version": self.code_version,
            "request_id": self.request_id,
        }
        return {key: value for key, value in values.items() if value}

    def software_versions(self) -> list[str]:
        """SoftwareVersions (0018,1020), one value per software: the model, then the training code."""
        versions = [f"{self.model_name} {self.model_version}"[:64]]
        if self.code_version:
            versions.append(f"voxelflow {self.code_version}"[:64])
        return versions

    def series_description(self, what: str) -> str:
        return f"AI {what} {self.model_name} v{self.model_version}"[:64]

    def identification(self) -> hd.AlgorithmIdentificationSequence:
        return hd.AlgorithmIdentificationSequence(
            name=self.model_name[:64],
            family=codes.cid7162.ArtificialIntelligence,
            version=self.model_version[:64],
            source="voxelflow",
            parameters=self.parameters(),
        )


def labelmap_supported() -> bool:
    """LABELMAP segmentations (one frame per slice holding segment numbers) need highdicom >= 0.23."""
    return hasattr(hd.seg.SegmentationTypeValues, "LABELMAP")


def frame_indices(affine_ras: np.ndarray, shape: tuple[int, int, int], ds: Dataset) -> tuple[np.ndarray, ...]:
    """(i, j, k) index arrays of shape (Rows, Columns) for every pixel of one source image."""
    inverse = np.linalg.inv(np.asarray(affine_ras, dtype=float))
    position = LPS_TO_RAS @ np.asarray(ds.ImagePositionPatient, dtype=float)
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)  # between rows, between columns
    along_row = LPS_TO_RAS @ orientation[:3] * column_spacing  # moving one column
    along_column = LPS_TO_RAS @ orientation[3:] * row_spacing  # moving one row
    origin = inverse[:3, :3] @ position + inverse[:3, 3]
    step_c = inverse[:3, :3] @ along_row
    step_r = inverse[:3, :3] @ along_column
    rows, columns = int(ds.Rows), int(ds.Columns)
    r, c = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
    index = origin[:, None, None] + step_r[:, None, None] * r + step_c[:, None, None] * c
    rounded = np.round(index)
    if np.abs(index - rounded).max() > GRID_TOLERANCE:
        raise GridMismatchError(f"instance {ds.SOPInstanceUID} is not on the mask grid")
    ijk = rounded.astype(np.int64)
    for axis in range(3):
        if ijk[axis].min() < 0 or ijk[axis].max() >= shape[axis]:
            raise GridMismatchError(f"instance {ds.SOPInstanceUID} lies outside the mask")
    return ijk[0], ijk[1], ijk[2]


def frames_on_source_grid(mask: np.ndarray, affine_ras: np.ndarray, datasets: Sequence[Dataset]) -> np.ndarray:
    """(len(datasets), Rows, Columns) label frames, frame n belonging to ``datasets[n]``."""
    shape = tuple(mask.shape)
    return np.stack([mask[frame_indices(affine_ras, shape, ds)] for ds in datasets])


# Type 2 attributes highdicom copies from the source; derived crops and de-identified series often lack them.
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "ReferringPhysicianName",
    "AccessionNumber",
)


def _with_type2_attributes(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Shallow copies with empty values for absent Type 2 attributes (the sources themselves are untouched)."""
    completed = []
    for ds in datasets:
        missing = [keyword for keyword in _TYPE2_COPIED if keyword not in ds]
        if missing:
            ds = copy.copy(ds)
            for keyword in missing:
                setattr(ds, keyword, "")
        completed.append(ds)
    return completed


def uid_for(request_id: str, what: str) -> str:
    """Deterministic UIDs: a retried job writes (and re-sends) the same SEG, not a second one."""
    return generate_uid(entropy_srcs=["voxelflow-inference", request_id, what])


def build_dicom_seg(
    mask: np.ndarray,
    affine_ras: np.ndarray,
    datasets: Sequence[Dataset],
    labels: Mapping[int, str],
    algorithm: AlgorithmInfo,
    manufacturer: str = "voxelflow",
    *,
    labelmap: bool | None = None,
) -> hd.seg.Segmentation:
    """A LABELMAP SEG where highdicom writes one (``labelmap=None``: whenever it can), BINARY otherwise.

    Segment numbers are 1..n in the order of the label values; a label of the model that the mask does not
    contain still gets its segment (empty), so segment numbers mean the same for every request of a model.
    """
    if labelmap is None:
        labelmap = labelmap_supported()
    frames = frames_on_source_grid(mask, affine_ras, datasets)
    foreground = sorted(int(v) for v in labels if int(v) != 0)
    segment_array = np.zeros(frames.shape, dtype=np.uint8)  # label values → segment numbers 1..n
    for number, value in enumerate(foreground, start=1):
        segment_array[frames == value] = number
    identification = algorithm.identification()
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=str(labels[value])[:64],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
            tracking_uid=uid_for(algorithm.request_id, f"segment-{value}"),
            tracking_id=f"{algorithm.model_name}:{labels[value]}"[:64],
        )
        for number, value in enumerate(foreground, start=1)
    ]
    return hd.seg.Segmentation(
        source_images=_with_type2_attributes(datasets),
        pixel_array=segment_array,
        segmentation_type=(
            hd.seg.SegmentationTypeValues.LABELMAP if labelmap else hd.seg.SegmentationTypeValues.BINARY
        ),
        segment_descriptions=descriptions,
        series_instance_uid=uid_for(algorithm.request_id, "series"),
        series_number=9001,
        sop_instance_uid=uid_for(algorithm.request_id, "instance"),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=algorithm.model_name[:64],
        software_versions=tuple(algorithm.software_versions()),  # type: ignore[arg-type]
        device_serial_number=algorithm.model_version[:64],
        series_description=algorithm.series_description("segmentation"),
        content_description=f"request {algorithm.request_id}"[:64],
        content_creator_name="voxelflow^inference",
        omit_empty_frames=False,
    )
