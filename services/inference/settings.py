"""Configuration of the inference service (environment variables ``VOXELFLOW_*``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr

from shared.settings import PseudonymSettings


class InferenceSettings(PseudonymSettings):
    model_name: str = Field(default="hippocampus", description="Registered model (MLflow) this service serves.")
    model_alias: str = Field(
        default="champion",
        description="Registry alias served by default; when it moves, the new version is "
        "loaded and warmed up before it takes traffic.",
    )
    candidate_alias: str = Field(default="candidate", description="Registry alias of the canary model.")
    canary_share: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Share of patients (by sha256 of their keyed pseudonym) routed to the candidate alias; 0 disables.",
    )
    alias_poll_seconds: float = Field(
        default=30.0, gt=0, description="How often the registry is asked where the aliases point."
    )
    backend: Literal["onnxruntime", "openvino", "triton"] = Field(
        default="onnxruntime",
        description="Where windows run: onnxruntime (the version's model/onnx export, in-process), openvino "
        "(the same export compiled by OpenVINO, in-process, fp32: the faster of the two on CPU for 3-D UNets) or "
        "triton (the version under triton/<model>/ in object storage, on a Triton server).",
    )
    triton_url: str = Field(default="127.0.0.1:8001", description="Triton gRPC address (backend=triton).")
    triton_model_repository: str | None = Field(
        default=None,
        description="Directory a local Triton server reads; triton/<model>/ is synced into it from object storage "
        "before a load. Unset: the server reads the bucket itself.",
    )
    triton_model_control: Literal["explicit", "poll"] = Field(
        default="explicit",
        description="The Triton server's --model-control-mode. explicit: this service loads and unloads the "
        "versions it serves (one server per service, as in the local stack). poll: a Triton shared by many "
        "replicas (the chart's, scaled by its HPA) loads every version its repository holds; the service only "
        "waits until a version is ready and never unloads one.",
    )
    triton_poll_settle_seconds: float = Field(
        default=0.0,
        ge=0,
        description="Poll mode: after a version is ready on the Triton pod that answered, wait this long before "
        "it takes traffic, so that every pod has polled the repository (the chart sets its poll interval + 5 s).",
    )
    triton_load_timeout_seconds: float = Field(
        default=300.0,
        gt=0,
        description="How long a version may take to become ready on Triton (in poll mode, a repository poll "
        "interval plus the load itself).",
    )
    mlflow_tracking_uri: str | None = Field(
        default=None, description="MLflow tracking/registry server (else MLFLOW_TRACKING_URI)."
    )
    onnxruntime_threads: int = Field(
        default=0, ge=0, description="Threads of the embedded ONNX Runtime session or OpenVINO model; 0 = its default."
    )
    sw_batch_size: int = Field(default=4, ge=1, description="Sliding-window windows sent per inference call.")
    sw_overlap: float = Field(default=0.25, ge=0.0, lt=1.0, description="Sliding-window overlap.")
    sync_max_voxels: int = Field(
        default=4_000_000,
        ge=1,
        description="Volumes up to this many voxels are answered synchronously; larger ones become a job.",
    )
    max_concurrent: int = Field(default=1, ge=1, description="Synchronous inferences run at the same time.")
    max_queue: int = Field(
        default=4, ge=0, description="Synchronous requests that may wait for a slot; beyond it: 429 + Retry-After."
    )
    queue_wait_seconds: float = Field(
        default=60.0, gt=0, description="Longest a queued synchronous request waits for a slot before 503."
    )
    max_queued_jobs: int = Field(
        default=100, ge=1, description="Jobs waiting in the Celery queue beyond which new jobs get 429."
    )
    retry_after_seconds: int = Field(default=5, ge=1, description="Retry-After sent with 429/503.")
    gpu_memory_reserve_fraction: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="Share of free GPU memory the memory guard keeps in reserve."
    )
    keep_largest_component: bool | None = Field(
        default=None,
        description="Default of the per-request option: keep each label's largest component only (true), never "
        "(false), or as the model chose on its validation cases and was scored with (unset).",
    )
    ingest_url: str = Field(
        default="http://127.0.0.1:8000", description="Base URL of the ingest service (catalogue + DICOMweb)."
    )
    ingest_token: SecretStr | None = Field(default=None, description="Token (researcher role) for ingest.")
    pacs_url: str | None = Field(
        default=None,
        pattern=r"^(https?://.+|dicom://[^@\\/]{1,16}@[^:/@]+:\d{1,5}/?)$",
        description="The PACS that receives the DICOM SEG and SR when a request asks: a DICOMweb root "
        "(http(s)://…, STOW-RS; also a source a request may read from) or dicom://AET@host:port (C-STORE).",
    )
    dicom_calling_aet: str = Field(
        default="VOXELFLOW", min_length=1, max_length=16, description="Our AE title when we C-STORE to the PACS."
    )
    pacs_username: str | None = Field(default=None, description="HTTP Basic user for the PACS, if it needs one.")
    pacs_password: SecretStr | None = Field(default=None, description="HTTP Basic password for the PACS.")
    allowed_dicomweb_roots: list[str] = Field(
        default_factory=list,
        description="DICOMweb roots a request may name as its source (besides pacs_url and ingest); anything "
        "else is refused so that the service cannot be pointed at arbitrary hosts.",
    )
    manufacturer: str = Field(default="voxelflow", description="Manufacturer written into DICOM SEG.")
