"""Is this a DICOM instance voxelflow can take? Pure checks, one reason code per refusal.

Reason codes are stable strings (they label the ``voxelflow_ingest_instances_rejected_total`` metric and
appear in STOW-RS responses); each maps to the DICOM failure status a PACS understands.
"""

from __future__ import annotations

import enum
from typing import IO

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian


class RejectReason(enum.StrEnum):
    UNPARSEABLE = "unparseable"
    MISSING_ATTRIBUTE = "missing_attribute"
    INVALID_UID = "invalid_uid"
    UNSUPPORTED_SOP_CLASS = "unsupported_sop_class"
    NO_PIXEL_DATA = "no_pixel_data"
    PIXEL_DATA_SIZE = "pixel_data_size"
    TOO_LARGE = "too_large"
    STUDY_MISMATCH = "study_mismatch"
    CONFLICT = "conflict"
    STORAGE_ERROR = "storage_error"


# PS3.18 STOW-RS / PS3.4 C-STORE failure statuses for each reason.
FAILURE_STATUS: dict[RejectReason, int] = {
    RejectReason.UNPARSEABLE: 0xC000,  # Cannot understand
    RejectReason.MISSING_ATTRIBUTE: 0xA900,  # Data set does not match SOP class
    RejectReason.INVALID_UID: 0xA900,
    RejectReason.UNSUPPORTED_SOP_CLASS: 0x0122,  # SOP class not supported
    RejectReason.NO_PIXEL_DATA: 0xA900,
    RejectReason.PIXEL_DATA_SIZE: 0xA900,
    RejectReason.TOO_LARGE: 0xA700,  # Out of resources
    RejectReason.STUDY_MISMATCH: 0xC409,  # Study Instance UID mismatch
    RejectReason.CONFLICT: 0x0111,  # Duplicate SOP instance (with different content)
    RejectReason.STORAGE_ERROR: 0x0110,  # Processing failure
}


class InstanceRejectedError(Exception):
    def __init__(self, reason: RejectReason, message: str, sop_class_uid: str = "", sop_instance_uid: str = ""):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid

    @property
    def failure_status(self) -> int:
        return FAILURE_STATUS[self.reason]


REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
IMAGE_PIXEL_ATTRIBUTES = ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel")
PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def is_supported_sop_class(uid: str) -> bool:
    """Image storage classes (single- and multi-frame, enhanced, legacy) and Segmentation.

    Structured reports, presentation states, waveforms, encapsulated documents and raw data carry no
    image voxelflow can train on or segment, so they are refused at the door rather than catalogued."""
    if uid == SEGMENTATION_STORAGE:
        return True
    name = UID(uid).name
    return name.endswith("Image Storage") or "Image Storage -" in name or name.endswith("Image Storage for Processing")


def read_instance(stream: IO[bytes]) -> Dataset:
    """Parse a DICOM Part-10 stream. The preamble is optional (some PACS send bare datasets with file meta),
    and so is the File Meta group: old modalities (an old Siemens MR) write a bare implicit-VR dataset,
    whose transfer syntax is then inferred from how pydicom could read it."""
    try:
        return _with_transfer_syntax(pydicom.dcmread(stream, force=False))
    except InvalidDicomError:
        stream.seek(0)
        try:
            dataset = pydicom.dcmread(stream, force=True)
        except Exception as exc:
            raise InstanceRejectedError(RejectReason.UNPARSEABLE, f"not a DICOM file: {exc}") from exc
        if "SOPInstanceUID" not in dataset:
            raise InstanceRejectedError(
                RejectReason.UNPARSEABLE,
                "not a DICOM Part-10 file (no preamble/DICM prefix and no SOP Instance UID)",
            ) from None
        return _with_transfer_syntax(dataset)
    except InstanceRejectedError:
        raise
    except Exception as exc:  # truncated files, bad lengths: pydicom raises many types
        raise InstanceRejectedError(RejectReason.UNPARSEABLE, f"unreadable DICOM: {type(exc).__name__}: {exc}") from exc


def _with_transfer_syntax(dataset: Dataset) -> Dataset:
    """Give a dataset read without (a complete) File Meta group the transfer syntax it was read in.

    Everything after reading (validation, de-identification, writing the stored copy) needs
    ``file_meta.TransferSyntaxUID``; pydicom knows how it decoded the dataset (``original_encoding``:
    implicit or explicit VR, little or big endian), and that is the transfer syntax of a bare dataset."""
    meta = dataset.file_meta if getattr(dataset, "file_meta", None) is not None else FileMetaDataset()
    if not str(meta.get("TransferSyntaxUID", "") or ""):
        implicit, little = getattr(dataset, "original_encoding", (None, None))
        try:  # touch an element so that a deferred read reveals its encoding
            dataset.get("SOPInstanceUID")
            implicit, little = dataset.original_encoding
        except Exception:  # unreadable content is reported by validate_instance
            pass
        if implicit is None:
            implicit, little = True, True  # PS3.5 A.1: the default transfer syntax
        if not little:
            meta.TransferSyntaxUID = ExplicitVRBigEndian
        else:
            meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    for meta_keyword, keyword in (
        ("MediaStorageSOPClassUID", "SOPClassUID"),
        ("MediaStorageSOPInstanceUID", "SOPInstanceUID"),
    ):
        try:
            if meta_keyword not in meta and keyword in dataset:
                setattr(meta, meta_keyword, str(dataset.get(keyword)))
        except Exception:  # a garbled UID is reported by validate_instance
            pass
    dataset.file_meta = meta
    return dataset


def validate_instance(dataset: Dataset) -> None:
    """Raise :class:`InstanceRejectedError` with the first problem found.

    pydicom decodes elements lazily, so a corrupt element (an unknown VR, a length past the end) only
    raises when it is first read, with whatever exception type its decoder chose: any such error is the
    sender's malformed file, refused as unparseable, never a server error."""
    try:
        _validate_instance(dataset)
    except InstanceRejectedError:
        raise
    except Exception as exc:
        raise InstanceRejectedError(
            RejectReason.UNPARSEABLE,
            f"unreadable element: {type(exc).__name__}: {str(exc)[:300]}",
            _safe_str(dataset, "SOPClassUID"),
            _safe_str(dataset, "SOPInstanceUID"),
        ) from exc


def _safe_str(dataset: Dataset, keyword: str) -> str:
    try:
        return str(dataset.get(keyword, "") or "")
    except Exception:
        return ""


def _validate_instance(dataset: Dataset) -> None:
    sop_class = _safe_str(dataset, "SOPClassUID")
    sop_instance = _safe_str(dataset, "SOPInstanceUID")
    try:
        missing = [kw for kw in REQUIRED_UIDS if not str(dataset.get(kw, "") or "").strip()]
    except Exception as exc:
        raise InstanceRejectedError(RejectReason.UNPARSEABLE, f"unreadable header: {exc}") from exc
    if any(tag.group == 0x0002 for tag in dataset.keys()):  # noqa: SIM118 (tags, without decoding elements)
        raise InstanceRejectedError(
            RejectReason.UNPARSEABLE,
            "File Meta (0002,xxxx) elements inside the data set: the File Meta group length is wrong",
            sop_class,
            sop_instance,
        )
    if missing:
        raise InstanceRejectedError(
            RejectReason.MISSING_ATTRIBUTE,
            f"missing required attribute(s): {', '.join(missing)}",
            sop_class,
            sop_instance,
        )
    for keyword in REQUIRED_UIDS:
        value = str(dataset.get(keyword))
        if not UID(value).is_valid:
            raise InstanceRejectedError(
                RejectReason.INVALID_UID, f"{keyword} {value!r} is not a valid UID", sop_class, sop_instance
            )
    if not is_supported_sop_class(sop_class):
        raise InstanceRejectedError(
            RejectReason.UNSUPPORTED_SOP_CLASS,
            f"SOP class {sop_class} ({UID(sop_class).name}) is not an image or segmentation",
            sop_class,
            sop_instance,
        )
    if not any(kw in dataset for kw in PIXEL_DATA_KEYWORDS):
        raise InstanceRejectedError(
            RejectReason.NO_PIXEL_DATA, "image object without pixel data", sop_class, sop_instance
        )
    missing_pixel_attrs = [kw for kw in IMAGE_PIXEL_ATTRIBUTES if kw not in dataset]
    if missing_pixel_attrs:
        raise InstanceRejectedError(
            RejectReason.MISSING_ATTRIBUTE,
            f"pixel data without {', '.join(missing_pixel_attrs)}",
            sop_class,
            sop_instance,
        )
    transfer_syntax = UID(str(dataset.file_meta.get("TransferSyntaxUID", "") or ""))
    if transfer_syntax and not transfer_syntax.is_transfer_syntax:
        raise InstanceRejectedError(
            RejectReason.UNPARSEABLE,
            f"transfer syntax {str(transfer_syntax)!r} is not a known transfer syntax",
            sop_class,
            sop_instance,
        )
    if "PixelData" in dataset and not (transfer_syntax and transfer_syntax.is_compressed):
        _check_native_pixel_data_size(dataset, sop_class, sop_instance)


def _check_native_pixel_data_size(dataset: Dataset, sop_class: str, sop_instance: str) -> None:
    """Uncompressed pixel data must hold Rows x Columns x Frames x Samples x BitsAllocated bits: a
    truncated transfer would otherwise be stored and only fail much later, at reconstruction."""
    try:
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
        expected_bits = int(dataset.Rows) * int(dataset.Columns) * frames * int(dataset.SamplesPerPixel)
        expected = (expected_bits * int(dataset.BitsAllocated) + 7) // 8
        actual = len(dataset.PixelData)
    except (TypeError, ValueError) as exc:
        raise InstanceRejectedError(
            RejectReason.PIXEL_DATA_SIZE, f"unreadable image pixel attributes: {exc}", sop_class, sop_instance
        ) from exc
    if actual < expected:
        raise InstanceRejectedError(
            RejectReason.PIXEL_DATA_SIZE,
            f"pixel data holds {actual} bytes, the image attributes need {expected}",
            sop_class,
            sop_instance,
        )
