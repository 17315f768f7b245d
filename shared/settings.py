"""Settings shared by every voxelflow service.

Each service declares exactly one subclass of :class:`VoxelflowSettings` in its own ``settings.py``;
all variables are read from the environment with the ``VOXELFLOW_`` prefix, so one ``stack.env`` file
(written by ``voxelflow stack up``) or one Kubernetes ConfigMap configures every service alike.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_STATE_DIR = Path(".voxelflow")


class VoxelflowSettings(BaseSettings):
    """Variables every service understands. Field descriptions are the documentation (docs/configuration.md)."""

    model_config = SettingsConfigDict(env_prefix="VOXELFLOW_", extra="ignore")

    database_url: str = Field(
        default=f"sqlite:///{DEFAULT_STATE_DIR}/voxelflow.db",
        description="SQLAlchemy URL of the catalogue/audit database. postgresql+psycopg://… in deployments; "
        "the SQLite default is for a single-machine trial.",
    )
    storage_url: str = Field(
        default=f"file://{DEFAULT_STATE_DIR.resolve()}/objects",
        description="Object storage: s3://ACCESS:SECRET@HOST:PORT/BUCKET[?secure=true] (MinIO, SeaweedFS, AWS) "
        "or file:///absolute/path for an embedded store.",
    )
    broker_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Celery broker and result backend (Redis).",
    )
    log_level: str = Field(default="INFO", description="Python logging level.")
    log_json: bool = Field(default=True, description="Structured JSON logs (one object per line) when true.")
    metrics_port: int | None = Field(
        default=None,
        description="Port of a Prometheus /metrics server for processes without an HTTP API (Celery workers, "
        "the DICOM receiver); the chart sets 9100. HTTP services serve /metrics on their own port.",
    )
    api_max_request_bytes: int = Field(
        default=2 * 1024**3,
        description="Largest request body any HTTP endpoint accepts; larger requests get 413.",
    )
    task_time_limits: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="Per Celery task name: [soft, hard] time limits in seconds, replacing the defaults of "
        "shared.contracts.tasks (e.g. a training round longer than 5.5 h; keep the broker's visibility timeout "
        "above the hard limit).",
    )
    project: str = Field(
        default="default",
        description="The project this deployment serves: the pseudonymisation namespace (the same patient gets "
        "the same pseudonym within a project) and the scope a project-scoped API token must match (403 otherwise).",
    )
    public_api_docs: bool = Field(
        default=False,
        description="Serve /docs, /redoc and /openapi.json without a token. False: they need any valid token, "
        "like every other path (a schema lists every route and parameter an attacker could probe).",
    )
    api_body_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        description="Longest a client may take to send a request body, from the first read; a slower or "
        "stalled client gets 408 and its connection is closed, so it cannot hold a worker.",
    )


class PseudonymSettings(VoxelflowSettings):
    """The deployment secret that keys every pseudonym (:mod:`shared.pseudonyms`, namespace ``project``), for
    the services that make them: ingest (de-identification) and inference (the patient reference of a request)."""

    deid_key: SecretStr | None = Field(
        default=None,
        description="Secret key of the keyed hash that pseudonymises UIDs and patient IDs. When unset, a "
        "random key is created once in deid_key_file (fine on one machine; set it explicitly in a cluster).",
    )
    deid_key_file: Path = Field(
        default=DEFAULT_STATE_DIR / "deid.key",
        description="Where the generated key is kept when deid_key is unset.",
    )

    def resolved_deid_key(self) -> bytes:
        from shared.pseudonyms import resolve_key

        return resolve_key(self.deid_key.get_secret_value() if self.deid_key else None, self.deid_key_file)
