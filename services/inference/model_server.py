"""What the service serves: a :class:`ServedModel`, independent of where its windows run.

A served model is the registry version's identity (name, version, registry URI), its *own* stored
preprocessing (the invertible inference transforms built from the spec logged with the model — never a
second copy kept here), its labels, and a ``predict`` that turns a preprocessed image batch into logits
(sliding-window inference over a backend: embedded ONNX Runtime or a Triton server). The lifecycle
(:mod:`services.inference.model_lifecycle`) and the request pipeline depend only on this class, so the
backend and the registry reader can change without touching either.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from monai.data.utils import dense_patch_slices
from monai.inferers.utils import _get_scan_interval
from monai.transforms import Compose

from services.inference.backends import ModelControl, TritonBackend
from services.inference.triton_repository import TritonModelConfig, model_prefix
from shared.contracts import artifacts as artifact_names
from shared.inference import InferenceBackend, OnnxRuntimeBackend, OpenVinoBackend, SlidingWindowPredictor

if TYPE_CHECKING:
    from shared.storage import ObjectStore

log = logging.getLogger("voxelflow.inference.models")


@dataclass
class ServedModel:
    """One loaded model version (load → preprocess → predict → postprocess, KServe style)."""

    name: str
    version: str
    registry_uri: str
    spec: Mapping[str, Any]
    labels: Mapping[int, str]  # label value → name; 0 is background
    transforms: Compose  # build_transforms(spec, "inference", load=False): the model's own preprocessing
    predictor: Callable[[torch.Tensor], torch.Tensor]  # (N, C, X, Y, Z) float32 → logits (N, K, X, Y, Z)
    roi_size: tuple[int, int, int]
    in_channels: int = 1
    overlap: float = 0.25
    on_close: Callable[[], None] = field(default=lambda: None)
    #: labels filtered to their largest component unless a request says otherwise (chosen on validation)
    largest_component_labels: tuple[int, ...] = ()
    #: the version's lineage tags written into DICOM outputs (provenance): training data and training code
    dataset_version: str = ""
    code_version: str = ""

    def predict(self, image: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.predictor(image)

    def warm_up(self) -> None:
        """Run one window through the backend so the first real request pays no lazy initialisation."""
        self.predict(torch.zeros((1, self.in_channels, *self.roi_size), dtype=torch.float32))

    def windows_for(self, spatial_shape: tuple[int, ...]) -> int:
        return count_windows(spatial_shape, self.roi_size, self.overlap)

    def close(self) -> None:
        self.on_close()


class ModelSource(Protocol):
    """Where versions come from: the registry in production (:class:`RegistryModelSource`)."""

    def resolve(self, alias: str) -> str | None:
        """The version the alias points at now, or None when the alias is not set."""

    def load(self, version: str) -> ServedModel:
        """Load (not yet warm) one version."""


def count_windows(spatial_shape: tuple[int, ...], roi_size: tuple[int, ...], overlap: float) -> int:
    """Windows MONAI's sliding-window inference visits for an image (padded up to the ROI where smaller)."""
    padded = tuple(max(s, r) for s, r in zip(spatial_shape, roi_size, strict=True))
    roi = tuple(min(r, s) for s, r in zip(padded, roi_size, strict=True))
    interval = _get_scan_interval(padded, roi, len(padded), (overlap,) * len(padded))
    return len(dense_patch_slices(padded, roi, interval))


class ModelNotServableError(RuntimeError):
    """A registry version the configured backend cannot serve (no export for it); the old version stays."""


@dataclass(frozen=True)
class VersionArtifacts:
    """What the service reads of a registry version: its own spec and labels, and which exports it has."""

    name: str
    version: str
    run_id: str
    spec: Mapping[str, Any]
    labels: Mapping[int, str]
    has_onnx: bool
    #: the ``inference`` section of the version's training config: how it was scored, so how it is served
    mirror_axes: tuple[int, ...] = ()
    largest_component_labels: tuple[int, ...] = ()
    dataset_version: str = ""  # the version's ``dataset_version`` tag
    code_version: str = ""  # its ``git_sha`` tag: the training code

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def read_version_artifacts(registry: Any, model_name: str, version: str) -> VersionArtifacts:
    """The version's ``model/preprocessing.json`` and ``model/labels.json``, and whether ``model/onnx`` exists.

    ``registry``: a ``shared.registry.ModelRegistry`` (or an ``MlflowClient``, wrapped). Only these small
    files are downloaded: the service never rebuilds the PyTorch network (the backends run the exports),
    so it does not fetch the weights either.
    """
    import json
    import tempfile

    from shared.evaluation.runner import inference_options
    from shared.registry import RegistryError, as_registry, run_id_of

    registry = as_registry(registry)
    model_version = registry.resolve(f"models:/{model_name}/{version}")
    run_id = run_id_of(model_version)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            spec = json.loads(registry.download_artifacts(run_id, artifact_names.PREPROCESSING, tmp).read_text())
            labels = json.loads(registry.download_artifacts(run_id, artifact_names.LABELS, tmp).read_text())
            config = registry.download_artifacts(run_id, artifact_names.TRAINING_CONFIG, tmp).read_text()
        except (RegistryError, OSError, ValueError) as exc:  # the version lacks the contract's files
            raise RegistryError(f"models:/{model_name}/{version}: cannot read its model/ files: {exc}") from exc
    inference = inference_options(config)  # how the version was scored is how it is served
    has_onnx = ONNX_ARTIFACT in registry.list_artifacts(run_id, artifact_names.ONNX_DIR)
    return VersionArtifacts(
        name=model_name,
        version=str(model_version.version),
        run_id=run_id,
        spec=spec,
        labels={int(k): str(v) for k, v in labels.items()},
        has_onnx=has_onnx,
        mirror_axes=tuple(int(a) for a in inference.get("mirror_axes") or ()),
        largest_component_labels=tuple(int(v) for v in inference.get("largest_component_labels") or ()),
        dataset_version=str((getattr(model_version, "tags", None) or {}).get("dataset_version", "")),
        code_version=str((getattr(model_version, "tags", None) or {}).get("git_sha", "")),
    )


ONNX_ARTIFACT = artifact_names.ONNX


class _TritonVersions:
    """Which versions of one model this process still serves on the Triton server.

    During a swap the old and the new version are both in use (in-flight requests finish on the old one),
    so loading the new version must not unload the old: each load names every version still held, and a
    version is dropped from the server only when its ServedModel is closed.
    """

    def __init__(self) -> None:
        self.held: set[int] = set()
        self.lock = threading.Lock()


class RegistryModelSource:
    """Versions of one registered model, read through ``shared.registry.ModelRegistry``, run on a backend.

    ``onnxruntime``: the version's ``model/onnx/model.onnx`` artifact in an embedded ONNX Runtime session;
    ``openvino``: the same artifact compiled by OpenVINO in this process (fp32).
    ``triton``: the version of ``triton/<model>/`` in object storage, loaded into a Triton server (synced
    into ``triton_repository`` first when the server reads a local directory). Either way the window size
    and channels come from the export itself, and windows go through one :class:`SlidingWindowPredictor`:
    everything above the backend is the same code path. A version without the export the backend needs is
    refused with the reason (run ``voxelflow models export``); the lifecycle keeps the old version.
    """

    def __init__(
        self,
        model_name: str,
        backend: str,
        *,
        store: ObjectStore | None = None,
        triton_url: str = "",
        triton_repository: str | Path | None = None,
        triton_model_control: ModelControl = "explicit",
        triton_load_timeout_s: float = 300.0,
        triton_poll_settle_s: float = 0.0,
        sw_batch_size: int = 4,
        overlap: float = 0.25,
        onnxruntime_threads: int | None = None,
        tracking_uri: str | None = None,
    ):
        if backend not in ("onnxruntime", "openvino", "triton"):
            raise ValueError(f"unknown backend {backend!r}: onnxruntime, openvino or triton")
        if backend == "triton" and store is None:
            raise ValueError("the triton backend reads its model repository from object storage: give a store")
        self.model_name = model_name
        self.backend = backend
        self.store = store
        self.triton_url = triton_url
        self.triton_repository = triton_repository
        self.triton_model_control: ModelControl = triton_model_control
        self.triton_load_timeout_s = triton_load_timeout_s
        self.triton_poll_settle_s = triton_poll_settle_s
        self.sw_batch_size = sw_batch_size
        self.overlap = overlap
        self.onnxruntime_threads = onnxruntime_threads
        self.tracking_uri = tracking_uri
        self._registry: Any = None
        self._triton = _TritonVersions()

    @property
    def registry(self) -> Any:
        """The ``shared.registry.ModelRegistry`` at ``tracking_uri`` (opened on first use)."""
        if self._registry is None:
            from shared.registry import open_registry

            self._registry = open_registry(self.tracking_uri)
        return self._registry

    def resolve(self, alias: str) -> str | None:
        version = self.registry.get_version_by_alias(self.model_name, alias)
        return None if version is None else str(version.version)

    def load(self, version: str) -> ServedModel:
        artifacts = read_version_artifacts(self.registry, self.model_name, version)
        backend: InferenceBackend
        if self.backend in ("onnxruntime", "openvino"):
            onnx, close = self._open_onnx(artifacts)
            in_shape = onnx.input_shape
            backend, in_channels, roi = onnx, int(in_shape[1]), tuple(int(d) for d in in_shape[2:])
        else:
            backend, close, config = self._open_triton(artifacts)
            in_channels, roi = config.in_channels, config.roi_size
        return served_model(artifacts, backend, roi, in_channels, self.sw_batch_size, self.overlap, close)

    def _open_onnx(
        self, artifacts: VersionArtifacts
    ) -> tuple[OnnxRuntimeBackend | OpenVinoBackend, Callable[[], None]]:
        import shutil
        import tempfile

        if not artifacts.has_onnx:
            raise ModelNotServableError(
                f"version {artifacts.version} has no ONNX export; run voxelflow models export --model {artifacts.uri}"
            )
        backend: OnnxRuntimeBackend | OpenVinoBackend
        if self.backend == "openvino":
            backend = OpenVinoBackend(threads=self.onnxruntime_threads)
        else:
            backend = OnnxRuntimeBackend(intra_op_threads=self.onnxruntime_threads)
        workdir = tempfile.mkdtemp(prefix=f"vf-serve-{artifacts.name}-{artifacts.version}-")
        try:
            onnx_path = self.registry.download_artifacts(artifacts.run_id, ONNX_ARTIFACT, workdir)
            backend.load(artifacts.name, artifacts.version, onnx_path)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)  # the session holds the model in memory
        return backend, backend.unload

    def _open_triton(self, artifacts: VersionArtifacts) -> tuple[TritonBackend, Callable[[], None], TritonModelConfig]:
        assert self.store is not None
        number = int(artifacts.version)
        prefix = f"{model_prefix(artifacts.name)}/{number}/"
        if not any(True for _ in self.store.list(prefix)):
            raise ModelNotServableError(
                f"version {artifacts.version} has no Triton model under {prefix}; "
                f"run voxelflow models export --model {artifacts.uri}"
            )
        backend = TritonBackend(
            self.triton_url,
            repository_dir=self.triton_repository,
            store=self.store,
            timeout_s=self.triton_load_timeout_s,
            model_control=self.triton_model_control,
            poll_settle_s=self.triton_poll_settle_s,
        )
        held = self._triton
        try:
            with held.lock:
                backend.load(artifacts.name, number, keep=sorted(held.held))
                held.held.add(number)
            config = backend.config
            assert config is not None  # set by a successful load
        except BaseException:
            backend.close()
            raise

        def close() -> None:
            with held.lock:
                held.held.discard(number)
                try:
                    backend.release(keep=sorted(held.held))
                except Exception:  # the server may be gone; closing must not fail a request
                    log.exception("releasing %s v%s on Triton failed", artifacts.name, number)
                finally:
                    backend.close()

        return backend, close, config


def served_model(
    artifacts: VersionArtifacts,
    backend: InferenceBackend,
    roi_size: tuple[int, ...],
    in_channels: int,
    sw_batch_size: int,
    overlap: float,
    on_close: Callable[[], None],
) -> ServedModel:
    """A registry version behind a backend: its own inference transforms, windows through the predictor."""
    from shared.preprocessing import PreprocessingSpec, build_transforms

    spec = PreprocessingSpec.from_dict(dict(artifacts.spec))
    predictor = SlidingWindowPredictor(
        backend, roi_size, sw_batch_size=sw_batch_size, overlap=overlap, mirror_axes=artifacts.mirror_axes
    )
    return ServedModel(
        name=artifacts.name,
        version=artifacts.version,
        registry_uri=artifacts.uri,
        spec=spec.to_dict(),
        labels=dict(artifacts.labels),
        transforms=build_transforms(spec, "inference", load=False),
        predictor=predictor,
        roi_size=tuple(int(r) for r in roi_size),  # type: ignore[arg-type]
        in_channels=in_channels,
        overlap=overlap,
        on_close=on_close,
        largest_component_labels=artifacts.largest_component_labels,
        dataset_version=artifacts.dataset_version,
        code_version=artifacts.code_version,
    )
