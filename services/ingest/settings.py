"""Configuration of the ingest service (environment variables ``VOXELFLOW_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, SecretStr

from shared.settings import DEFAULT_STATE_DIR, VoxelflowSettings


class PacsConnection(BaseModel):
    """A PACS voxelflow can pull from over DICOMweb (QIDO-RS + WADO-RS)."""

    url: str = Field(description="DICOMweb root, e.g. http://pacs:8042/dicom-web")
    username: str | None = None
    password: SecretStr | None = None


class IngestSettings(VoxelflowSettings):
    project: str = Field(
        default="default",
        description="Pseudonymisation namespace: the same patient gets the same pseudonym within a project.",
    )
    site: str = Field(default="local", description="Site (institution) recorded on every series received here.")
    deid_key: SecretStr | None = Field(
        default=None,
        description="Secret key of the keyed hash that pseudonymises UIDs and patient IDs. When unset, a "
        "random key is created once in deid_key_file (fine on one machine; set it explicitly in a cluster).",
    )
    deid_key_file: Path = Field(
        default=DEFAULT_STATE_DIR / "deid.key",
        description="Where the generated key is kept when deid_key is unset.",
    )
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
        description='PACS to pull from, as JSON: {"orthanc": {"url": "http://127.0.0.1:8042/dicom-web"}}.',
    )
    public_url: str = Field(
        default="http://127.0.0.1:8000",
        description="Base URL clients reach this service at; used in RetrieveURL attributes.",
    )
    preprocessing_queue: str = Field(
        default="preprocessing", description="Queue that receives 'series ready' messages."
    )

    def resolved_deid_key(self) -> bytes:
        if self.deid_key is not None:
            return self.deid_key.get_secret_value().encode()
        import secrets

        path = self.deid_key_file
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_hex(32))
            path.chmod(0o600)
        return path.read_text().strip().encode()
