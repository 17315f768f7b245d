"""A Triton model repository for an exported segmentation network, kept in object storage.

Layout (contract: ``triton/{model_name}/...`` in the deployment's bucket)::

    triton/<model>/config.pbtxt
    triton/<model>/<version>/model.onnx      (ONNX; and model.py when served by the Python backend)
    triton/<model>/<version>/model.plan      (TensorRT engine, GPU clusters)

The configuration is built as Triton's own ``ModelConfig`` protobuf (shipped with tritonclient) and
rendered with protobuf's text format, so a field Triton does not know fails here, not in the server.
Three flavours of the same model: ``tensorrt_plan`` (GPU clusters with an engine), ``onnxruntime_onnx``
(Triton's ONNX Runtime backend) and ``python_onnx`` — Triton's Python backend running ONNX Runtime in
``model.py``, which is what the CPU tritonserver bundled in nvidia-pytriton can serve.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from google.protobuf import json_format, text_format

from shared.contracts import artifacts, layout
from shared.inference.backends import INPUT_NAME, OUTPUT_NAME

if TYPE_CHECKING:
    from shared.storage import ObjectStore

REPOSITORY_PREFIX = layout.TRITON_PREFIX
Flavour = Literal["python_onnx", "onnxruntime_onnx", "tensorrt_plan"]

#: model.py of the Python-backend flavour. It runs under Triton's Python backend stub with the packages
#: of the Triton environment (.venv-triton: numpy<2 + onnxruntime), never the services' environment.
PYTHON_BACKEND_MODEL = '''\
"""Triton Python-backend model: ONNX Runtime on model.onnx next to this file (written by voxelflow)."""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        here = os.path.join(args["model_repository"], args["model_version"])
        # the embedded backend's options (shared.inference.backends.onnxruntime_session_options)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        threads = int(params.get("intra_op_threads", "0"))
        if threads:
            options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", params.get("allow_spinning", "0"))
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(os.path.join(here, "model.onnx"), options, providers=providers)
        self.input_name = params.get("input_name", "input")
        self.output_name = params.get("output_name", "logits")

    def execute(self, requests):
        # Dynamic batching hands over several requests at once: one ONNX Runtime call for all of them.
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        sizes = [a.shape[0] for a in arrays]
        batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)  # no copy for one request
        logits = self.session.run([self.output_name], {self.input_name: batch})[0]
        responses, start = [], 0
        for size in sizes:
            out = pb_utils.Tensor(self.output_name, logits if len(sizes) == 1 else logits[start : start + size].copy())
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            start += size
        return responses

    def finalize(self):
        self.session = None
'''


@dataclass(frozen=True)
class TritonModelConfig:
    """Everything ``config.pbtxt`` says about one model; rendered through Triton's ModelConfig proto."""

    name: str
    in_channels: int
    out_channels: int
    roi_size: tuple[int, int, int]
    flavour: Flavour = "python_onnx"
    max_batch_size: int = 8
    preferred_batch_sizes: tuple[int, ...] = (4, 8)
    max_queue_delay_us: int = 2000
    instance_kind: Literal["KIND_CPU", "KIND_GPU"] = "KIND_CPU"
    instance_count: int = 1
    #: exactly these versions (a model-control load request); None: see ``all_versions``
    versions: tuple[int, ...] | None = None
    #: with ``versions`` None: every version in the repository (what is stored, for a polling server)
    #: rather than Triton's default policy, the latest version only
    all_versions: bool = False
    parameters: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1 (the batch axis is dynamic)")
        if any(b < 1 or b > self.max_batch_size for b in self.preferred_batch_sizes):
            raise ValueError(f"preferred batch sizes {self.preferred_batch_sizes} must be in 1..{self.max_batch_size}")
        if self.flavour == "tensorrt_plan" and self.instance_kind != "KIND_GPU":
            raise ValueError("a TensorRT plan runs on GPU instances only (instance_kind KIND_GPU)")
        if len(self.roi_size) != 3 or min(self.roi_size) < 1:
            raise ValueError(f"roi_size must be three positive sizes, got {self.roi_size}")

    def with_versions(self, versions: Sequence[int]) -> TritonModelConfig:
        return replace(self, versions=tuple(int(v) for v in versions), all_versions=False)

    def to_proto(self) -> Any:
        from tritonclient.grpc import model_config_pb2 as mc

        config = mc.ModelConfig(name=self.name, max_batch_size=self.max_batch_size)
        if self.flavour == "python_onnx":
            config.backend = "python"
        else:
            config.platform = self.flavour
        config.input.add(name=INPUT_NAME, data_type=mc.TYPE_FP32, dims=[self.in_channels, *self.roi_size])
        config.output.add(name=OUTPUT_NAME, data_type=mc.TYPE_FP32, dims=[self.out_channels, *self.roi_size])
        kind = getattr(mc.ModelInstanceGroup, self.instance_kind)
        config.instance_group.add(kind=kind, count=self.instance_count)
        config.dynamic_batching.preferred_batch_size.extend(self.preferred_batch_sizes)
        config.dynamic_batching.max_queue_delay_microseconds = self.max_queue_delay_us
        if self.versions is not None:
            config.version_policy.specific.versions.extend(self.versions)
        elif self.all_versions:
            config.version_policy.all.SetInParent()
        params = dict(self.parameters)
        if self.flavour == "python_onnx":
            params.setdefault("input_name", INPUT_NAME)
            params.setdefault("output_name", OUTPUT_NAME)
        for key, value in sorted(params.items()):
            config.parameters[key].string_value = value
        return config

    def to_pbtxt(self) -> str:
        return text_format.MessageToString(self.to_proto())

    def to_json(self) -> dict[str, Any]:
        """The JSON form Triton's model-control API accepts as a ``config`` override."""
        return json_format.MessageToDict(self.to_proto(), preserving_proto_field_name=True)

    @classmethod
    def from_pbtxt(cls, text: str) -> TritonModelConfig:
        """Parse a ``config.pbtxt`` this module wrote (strict: unknown fields raise ParseError)."""
        from tritonclient.grpc import model_config_pb2 as mc

        proto = text_format.Parse(text, mc.ModelConfig())
        flavour = "python_onnx" if proto.backend == "python" else proto.platform
        if flavour not in ("python_onnx", "onnxruntime_onnx", "tensorrt_plan"):
            raise ValueError(f"not a voxelflow model config: backend {proto.backend!r}, platform {proto.platform!r}")
        (inp,) = proto.input
        (out,) = proto.output
        group = proto.instance_group[0]
        versions = tuple(proto.version_policy.specific.versions) if proto.version_policy.HasField("specific") else None
        return cls(
            name=proto.name,
            in_channels=int(inp.dims[0]),
            out_channels=int(out.dims[0]),
            roi_size=tuple(int(d) for d in inp.dims[1:]),  # type: ignore[arg-type]
            flavour=flavour,  # type: ignore[arg-type]  # checked against Flavour above
            max_batch_size=proto.max_batch_size,
            preferred_batch_sizes=tuple(proto.dynamic_batching.preferred_batch_size),
            max_queue_delay_us=proto.dynamic_batching.max_queue_delay_microseconds,
            instance_kind=mc.ModelInstanceGroup.Kind.Name(group.kind),
            instance_count=group.count,
            versions=versions,
            all_versions=proto.version_policy.HasField("all"),
            parameters={k: v.string_value for k, v in proto.parameters.items()},
        )


def flavour_for(gpu: bool, has_engine: bool, python_backend: bool = True) -> tuple[Flavour, str]:
    """Which flavour (and instance kind) a cluster serves: TensorRT on GPUs with an engine, else ONNX."""
    if gpu and has_engine:
        return "tensorrt_plan", "KIND_GPU"
    if python_backend:
        return "python_onnx", "KIND_GPU" if gpu else "KIND_CPU"
    return "onnxruntime_onnx", "KIND_GPU" if gpu else "KIND_CPU"


def onnx_io_shapes(onnx_path: str | Path) -> tuple[list[int | str], list[int | str]]:
    """Input and output shapes of an exported model (dynamic axes as their names)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)

    def dims(value_info: Any) -> list[int | str]:
        return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value_info.type.tensor_type.shape.dim]

    inputs = {i.name: dims(i) for i in model.graph.input}
    outputs = {o.name: dims(o) for o in model.graph.output}
    if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
        raise ValueError(
            f"{onnx_path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, got {inputs}, {outputs}"
        )
    return inputs[INPUT_NAME], outputs[OUTPUT_NAME]


def config_from_onnx(onnx_path: str | Path, model_name: str, **kwargs: Any) -> TritonModelConfig:
    """The config whose tensor shapes are those of the exported ONNX graph (batch axis excluded)."""
    in_shape, out_shape = onnx_io_shapes(onnx_path)
    if not all(isinstance(d, int) and d > 0 for d in in_shape[1:]):
        raise ValueError(f"{onnx_path}: spatial input dims must be fixed (the window size), got {in_shape}")
    return TritonModelConfig(
        name=model_name,
        in_channels=int(in_shape[1]),
        out_channels=int(out_shape[1]),
        roi_size=tuple(int(d) for d in in_shape[2:]),  # type: ignore[arg-type]
        **kwargs,
    )


def model_prefix(model_name: str) -> str:
    if not model_name or "/" in model_name or model_name.startswith("."):
        raise ValueError(f"invalid Triton model name {model_name!r}")
    return layout.triton_model_prefix(model_name)


def write_model_version(
    store: ObjectStore,
    config: TritonModelConfig,
    version: int,
    onnx_path: str | Path | None = None,
    engine_path: str | Path | None = None,
) -> list[str]:
    """Write one version of a model (and the model's ``config.pbtxt``) under ``triton/<model>/``.

    The version's files go first and ``config.pbtxt`` last, so a reader that sees the new config also
    sees the files it names. The stored config serves every version present (``all_versions``): a Triton
    that polls the repository (a cluster's, shared by every inference replica) loads a new version beside
    the old ones, which stay until :func:`prune_model_versions` removes them; an explicitly controlled
    Triton is told the exact versions in each load request instead. Returns the keys written.
    """
    if int(version) < 1:
        raise ValueError("Triton model versions are positive integers")
    prefix = f"{model_prefix(config.name)}/{int(version)}"
    written: list[str] = []
    if config.flavour == "tensorrt_plan":
        if engine_path is None:
            raise ValueError("the tensorrt_plan flavour needs engine_path")
        written.append(store.put_file(f"{prefix}/model.plan", str(engine_path)).key)
    else:
        if onnx_path is None:
            raise ValueError(f"the {config.flavour} flavour needs onnx_path")
        written.append(store.put_file(f"{prefix}/{artifacts.ONNX_FILE}", str(onnx_path)).key)
    if config.flavour == "python_onnx":
        written.append(store.put_bytes(f"{prefix}/model.py", PYTHON_BACKEND_MODEL.encode(), "text/x-python").key)
    stored = replace(config, versions=None, all_versions=True)
    written.append(
        store.put_bytes(f"{model_prefix(config.name)}/config.pbtxt", stored.to_pbtxt().encode(), "text/plain").key
    )
    return written


def model_versions(store: ObjectStore, model_name: str) -> list[int]:
    """The version numbers under ``triton/<model>/`` in object storage, ascending."""
    prefix = model_prefix(model_name) + "/"
    found = {key[len(prefix) :].split("/", 1)[0] for key in store.list(prefix)}
    return sorted(int(part) for part in found if part.isdigit())


def prune_model_versions(store: ObjectStore, model_name: str, keep: Collection[int]) -> list[int]:
    """Delete every version of ``triton/<model>/`` not in ``keep``; returns the versions removed.

    A polling Triton unloads a version once its directory is gone, so call this only for versions no
    registry alias points at any more (``export_registered_model`` keeps those and the newest few).
    """
    keep = {int(v) for v in keep}
    removed = [v for v in model_versions(store, model_name) if v not in keep]
    for version in removed:
        for key in list(store.list(f"{model_prefix(model_name)}/{version}/")):
            store.delete(key)
    return removed


def sync_repository(store: ObjectStore, local_dir: str | Path, model_name: str | None = None) -> list[Path]:
    """Mirror ``triton/`` (or one model of it) from object storage into the directory tritonserver reads.

    Files whose size already matches are kept (versions are immutable once written; ``config.pbtxt`` is
    always refreshed); local versions of the model that object storage no longer holds are removed. Each
    file is written to a temporary name and renamed, so the server never reads a
    half-written model. Returns the local paths written.
    """
    local_dir = Path(local_dir)
    prefix = model_prefix(model_name) + "/" if model_name else REPOSITORY_PREFIX + "/"
    written: list[Path] = []
    keys = list(store.list(prefix))
    if model_name and not keys:
        raise FileNotFoundError(f"no Triton model {model_name!r} under {prefix} in {store.url}")
    for key in keys:
        relative = key[len(REPOSITORY_PREFIX) + 1 :]
        if ".." in Path(relative).parts:
            raise ValueError(f"refusing key outside the repository: {key}")
        target = local_dir / relative
        info = store.stat(key)
        if target.name != "config.pbtxt" and target.is_file() and target.stat().st_size == info.size:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        os.close(fd)
        try:
            store.download_file(key, tmp)
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
        written.append(target)
    if model_name:  # a mirror: versions pruned from object storage leave the server's directory too
        present = set(model_versions(store, model_name))
        for stale in (local_dir / model_name).iterdir():
            if stale.is_dir() and stale.name.isdigit() and int(stale.name) not in present:
                shutil.rmtree(stale)
    return written


def local_model_config(repository_dir: str | Path, model_name: str) -> TritonModelConfig:
    path = Path(repository_dir) / model_name / "config.pbtxt"
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: write the model with write_model_version and sync it first")
    return TritonModelConfig.from_pbtxt(path.read_text())
