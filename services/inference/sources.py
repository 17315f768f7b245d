"""Where the image to segment comes from, always turned into one :class:`SourceVolume`.

* a DICOMweb series URL (``…/studies/{study}/series/{series}``) on the PACS or another allowed root,
  fetched with dicomweb-client (WADO-RS);
* a series of voxelflow's catalogue: ingest says which study it belongs to (``GET /series/{uid}``), then
  the instances come over ingest's own WADO-RS;
* an uploaded NIfTI.

DICOM sources keep their instances: the DICOM SEG must reference them and sit on their grid. The volume
is built by highdicom (sorting along the slice normal, checking regular spacing) and carried as
NIfTI-style arrays: axes (i, j, k) with ``affine @ [i, j, k, 1]`` = RAS position in mm.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import highdicom as hd
import httpx
import numpy as np
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset

from shared.inference.segmentation import VolumeError, read_nifti
from shared.validation import DICOM_UID_PATTERN

_UID = DICOM_UID_PATTERN[1:-1]
# What the API admits as a DICOMweb series URL (no whitespace or control characters; UIDs by their grammar).
SERIES_URL_PATTERN = rf"^https?://[^\x00-\x20\x7f]+?/studies/{_UID}/series/{_UID}/?$"
SERIES_URL = re.compile(
    rf"^(?P<root>https?://[^\x00-\x20\x7f]+?)/studies/(?P<study>{_UID})/series/(?P<series>{_UID})/?$"
)


class SourceError(ValueError):
    """The source cannot be used: bad reference, not found, not a volume. Maps to 4xx."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass
class SourceVolume:
    array: np.ndarray  # (i, j, k) float32
    affine: np.ndarray  # (4, 4) RAS
    datasets: list[Dataset] = field(default_factory=list)  # DICOM source instances; empty for NIfTI
    patient_id: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None

    @property
    def voxels(self) -> int:
        return int(np.prod(self.array.shape))


@dataclass(frozen=True)
class DicomwebSeries:
    """A series on a DICOMweb server and how to authenticate there."""

    root: str
    study_uid: str
    series_uid: str
    headers: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    def client(self) -> DICOMwebClient:
        return DICOMwebClient(self.root, headers=self.headers or None, timeout=120)


def parse_series_url(url: str, allowed_roots: dict[str, dict[str, str]]) -> DicomwebSeries:
    """Split a series URL and pick the credentials of the allowed root it lies under (else refuse)."""
    match = SERIES_URL.match(url.strip())
    if not match:
        raise SourceError(f"not a DICOMweb series URL (…/studies/{{study}}/series/{{series}}): {url!r}")
    root = match["root"].rstrip("/")
    for allowed, headers in allowed_roots.items():
        if root == allowed.rstrip("/"):
            return DicomwebSeries(root, match["study"], match["series"], headers)
    raise SourceError(f"DICOMweb root {root!r} is not one this service may read from", status=403)


def catalogue_series(ingest_url: str, headers: dict[str, str], series_uid: str) -> DicomwebSeries:
    """Locate a catalogue series through ingest: its study UID, then ingest's DICOMweb root."""
    try:
        response = httpx.get(f"{ingest_url.rstrip('/')}/series/{series_uid}", headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise ConnectionError(f"ingest unreachable: {exc}") from exc
    if response.status_code == 404:
        raise SourceError(f"series {series_uid} is not in the catalogue", status=404)
    if response.status_code >= 400:
        raise SourceError(f"ingest answered {response.status_code} for series {series_uid}: {response.text[:200]}")
    body = response.json()
    return DicomwebSeries(
        f"{ingest_url.rstrip('/')}/dicomweb", body["study_instance_uid"], body["series_instance_uid"], headers
    )


def series_voxels(series: DicomwebSeries) -> int:
    """Voxel count from WADO-RS metadata (no pixel data moved): decides sync vs job before fetching."""
    try:
        metadata = series.client().retrieve_series_metadata(series.study_uid, series.series_uid)
    except Exception as exc:
        raise _as_source_error(exc, series) from exc
    total = 0
    for item in metadata:
        ds = Dataset.from_json(item, bulk_data_uri_handler=lambda *_: b"")  # only the header is needed
        total += int(ds.get("Rows", 0)) * int(ds.get("Columns", 0)) * int(ds.get("NumberOfFrames", 1) or 1)
    if total == 0:
        raise SourceError(f"series {series.series_uid} has no image instances")
    return total


def fetch_series(series: DicomwebSeries) -> SourceVolume:
    try:
        datasets = series.client().retrieve_series(series.study_uid, series.series_uid)
    except Exception as exc:
        raise _as_source_error(exc, series) from exc
    return volume_from_datasets(datasets)


def _as_source_error(exc: Exception, series: DicomwebSeries) -> Exception:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status == 404:
        return SourceError(f"series {series.series_uid} not found at {series.root}", status=404)
    if status is not None and 400 <= status < 500:
        return SourceError(f"{series.root} refused the series ({status})")
    return ConnectionError(f"could not fetch series {series.series_uid} from {series.root}: {exc}")


def volume_from_datasets(datasets: list[Dataset]) -> SourceVolume:
    """Single-frame instances of one series → volume (highdicom checks spacing and orientation)."""
    images = [ds for ds in datasets if "PixelData" in ds and "ImagePositionPatient" in ds]
    if len(images) < 2:
        raise SourceError("the series has fewer than two positioned image instances: not a volume")
    if len({str(ds.SeriesInstanceUID) for ds in images}) != 1:
        raise SourceError("the instances belong to more than one series")
    try:
        volume = hd.get_volume_from_series(images, dtype=np.float32, rtol=0.01, orientation_tol=1e-4)
    except (ValueError, KeyError, AttributeError) as exc:
        raise SourceError(f"the series is not a regular volume: {exc}") from exc
    volume = volume.permute_spatial_axes([2, 1, 0])  # (slice, row, column) → (i=column, j=row, k=slice)
    first = images[0]
    return SourceVolume(
        array=np.ascontiguousarray(volume.array, dtype=np.float32),
        affine=np.asarray(volume.get_affine("RAS"), dtype=float),
        datasets=images,
        patient_id=str(first.get("PatientID", "")) or None,
        study_uid=str(first.StudyInstanceUID),
        series_uid=str(first.SeriesInstanceUID),
    )


def volume_from_nifti(data: bytes, patient_id: str | None = None) -> SourceVolume:
    """An uploaded NIfTI (gzipped or not), read as evaluation reads its cases (``shared.inference.read_nifti``)."""
    try:
        array, affine = read_nifti(data)
    except VolumeError as exc:
        raise SourceError(str(exc)) from exc
    return SourceVolume(array=array, affine=affine, patient_id=patient_id)
