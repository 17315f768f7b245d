"""Configuration of the ingest service (environment variables ``VOXELFLOW_*``)."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, field_validator

from shared.settings import PseudonymSettings


class PacsConnection(BaseModel):
    """A PACS voxelflow can pull from: over DICOMweb (QIDO-RS + WADO-RS) when ``url`` is http(s)://, over
    DIMSE (C-FIND + C-MOVE or C-GET) when it is ``dimse://AET@host:port``. The scheme picks the protocol
    because that is the one thing a PACS administrator tells you; everything else has a working default."""

    url: str = Field(description="DICOMweb root (http://pacs:8042/dicom-web) or DIMSE peer (dimse://ORTHANC@pacs:4242)")
    username: str | None = Field(default=None, description="DICOMweb: HTTP Basic user.")
    password: SecretStr | None = Field(default=None, description="DICOMweb: HTTP Basic password.")
    retrieve: Literal["move", "get"] = Field(
        default="move",
        description="DIMSE: C-MOVE (the PACS opens an association to voxelflow's receiver, which it must know "
        "as a modality) or C-GET (instances come back on the pull's own association; no PACS-side setup).",
    )
    calling_ae_title: str | None = Field(
        default=None,
        max_length=16,
        description="DIMSE: our AE title on the pull's associations (default: dimse_ae_title).",
    )
    move_destination: str | None = Field(
        default=None,
        max_length=16,
        description="DIMSE C-MOVE: the AE title the PACS sends to, voxelflow's receiver (default: dimse_ae_title).",
    )
    timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="Longest wait for one answer from the PACS (HTTP read, DIMSE association/message); the whole "
        "pull is bounded by the ingest.pull_from_pacs task time limit.",
    )

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme in ("http", "https") and parts.netloc:
            return url
        if parts.scheme == "dimse":
            try:
                port = parts.port
            except ValueError:
                port = None
            if parts.username and parts.hostname and port and len(parts.username) <= 16:
                return url
            raise ValueError(f"DIMSE PACS URL {url!r} must be dimse://AET@host:port (AE title at most 16 characters)")
        raise ValueError(f"PACS URL {url!r}: the scheme must be http(s):// (DICOMweb) or dimse:// (DIMSE)")

    @property
    def protocol(self) -> Literal["dicomweb", "dimse"]:
        return "dimse" if self.url.startswith("dimse:") else "dicomweb"


class IngestSettings(PseudonymSettings):
    site: str = Field(default="local", description="Site (institution) recorded on every series received here.")
    max_instance_bytes: int = Field(
        default=1024**3, description="Largest single DICOM instance accepted (STOW part or C-STORE)."
    )
    series_stable_seconds: float = Field(
        default=10.0,
        description="A series counts as complete when no instance arrived for this long; then it is "
        "reconstructed and announced to preprocessing.",
    )
    dimse_ae_title: str = Field(default="VOXELFLOW", description="AE title of the C-STORE/C-ECHO receiver.")
    dimse_port: int = Field(default=11112, description="TCP port of the C-STORE/C-ECHO receiver.")
    dimse_host: str = Field(default="127.0.0.1", description="Address the DICOM receiver binds to.")
    dimse_allowed_ae_titles: list[str] = Field(
        default_factory=list,
        description="Calling AE titles allowed to store; empty = any (restrict by NetworkPolicy instead).",
    )
    pacs: dict[str, PacsConnection] = Field(
        default_factory=dict,
        description='PACS to pull from, as JSON: {"orthanc": {"url": "http://127.0.0.1:8042/dicom-web"}, '
        '"old-pacs": {"url": "dimse://PACS@10.0.0.5:104", "retrieve": "move"}}.',
    )
    public_url: str = Field(
        default="http://127.0.0.1:8000",
        description="Base URL clients reach this service at; used in RetrieveURL attributes.",
    )
    preprocessing_queue: str = Field(
        default="preprocessing", description="Queue that receives 'series ready' messages."
    )
    routing_queue: str = Field(
        default="inference",
        max_length=200,
        description="Queue of inference's routing rules (task inference.route_series): every completed series is "
        "offered there. Empty: series are not offered, so no routing rule ever fires.",
    )
