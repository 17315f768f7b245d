"""Where the network runs for the shared predictor: a PyTorch module in this process or an ONNX Runtime session.

Every backend takes the same thing (a float32 batch of windows, ``(N, C, X, Y, Z)``) and gives back the
same thing (float32 logits, ``(N, K, X, Y, Z)``), so everything above them — sliding windows, the
inference service, ``voxelflow evaluate``, the held-out test Dice at registration, the export parity
gate — is one code path whichever runs the model. The Triton backend (a server, so the inference
service's) lives in ``services.inference.backends`` and implements the same :class:`InferenceBackend`.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch

#: tensor names of every export (ONNX, TorchScript wrapper, Triton config): the serving contract
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class BackendError(RuntimeError):
    """The backend cannot serve: no model loaded, the server refused the model, or the input is wrong."""


@runtime_checkable
class InferenceBackend(Protocol):
    """What the predictor needs from a backend; one model version is loaded at a time."""

    @property
    def ready(self) -> bool:
        """True when a model is loaded and a request would be answered now."""
        ...

    def load(self, model_name: str, version: int | str, path: str | Path | None = None) -> None:
        """Load ``model_name`` version ``version`` (``path``: an ONNX file or a Triton model repository)."""
        ...

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a float32 batch ``(N, C, X, Y, Z)``."""
        ...

    def unload(self) -> None:
        """Release the loaded model (idempotent)."""
        ...


def check_batch(batch: np.ndarray) -> np.ndarray:
    """The batch as a C-contiguous float32 5-D array, or a clear error (never a silent reshape)."""
    if not isinstance(batch, np.ndarray):
        raise BackendError(f"batch must be a numpy array, got {type(batch).__name__}")
    if batch.ndim != 5:
        raise BackendError(f"batch must be 5-D (N, C, X, Y, Z), got shape {batch.shape}")
    if batch.shape[0] == 0:
        raise BackendError("batch is empty (N = 0)")
    if not np.issubdtype(batch.dtype, np.floating):
        raise BackendError(f"batch must be floating point, got {batch.dtype}")
    if not np.isfinite(batch).all():
        raise BackendError("batch contains NaN or infinite values")
    return np.ascontiguousarray(batch, dtype=np.float32)


def _resolve_onnx(model_name: str, version: int | str, path: str | Path | None) -> Path:
    """An ONNX file given directly, or ``<repository>/<model_name>/<version>/model.onnx``."""
    if path is None:
        raise BackendError("the ONNX Runtime backend needs a path: an .onnx file or a model repository")
    path = Path(path)
    candidate = path if path.is_file() else path / model_name / str(version) / "model.onnx"
    if not candidate.is_file():
        raise BackendError(f"no ONNX model at {candidate}")
    return candidate


def onnxruntime_session_options(intra_op_threads: int | None = None, allow_spinning: bool = False) -> Any:
    """Session options for serving on a CPU that other work shares (the inference worker, CI, a pod).

    Why each: graph optimisation level ALL lets ONNX Runtime fuse and re-lay convolutions (NCHWc blocks),
    which is most of its lead over eager PyTorch on 3-D UNets; one inter-op thread and sequential execution
    because a UNet is a chain (parallel branches buy nothing, extra pools only contend); ``intra_op_threads``
    equal to what PyTorch would get, so a comparison is fair; no spin-waiting, because the predictor's
    stitching runs on the same cores between calls and spinning pool threads would steal them.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    return options


class OnnxRuntimeBackend:
    """ONNX Runtime inside the calling process (CUDA provider first when this onnxruntime build has it)."""

    def __init__(
        self, providers: list[str] | None = None, intra_op_threads: int | None = None, allow_spinning: bool = False
    ) -> None:
        self.providers = providers
        self.intra_op_threads = intra_op_threads
        self.allow_spinning = allow_spinning
        self.model_name: str | None = None
        self.version: str | None = None
        self._session = None
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self._session is not None

    @property
    def input_shape(self) -> tuple[int | str, ...]:
        """The loaded model's input shape (the batch axis as its name, the window size as integers)."""
        if self._session is None:
            raise BackendError("no model loaded")
        return tuple(self._session.get_inputs()[0].shape)

    def load(self, model_name: str, version: int | str, path: str | Path | None = None) -> None:
        import onnxruntime as ort

        onnx_path = _resolve_onnx(model_name, version, path)
        options = onnxruntime_session_options(self.intra_op_threads, self.allow_spinning)
        available = ort.get_available_providers()
        providers = self.providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise BackendError(f"ONNX Runtime could not load {onnx_path}: {exc}") from exc
        names = [i.name for i in session.get_inputs()]
        if INPUT_NAME not in names:
            raise BackendError(f"{onnx_path} has inputs {names}, expected {INPUT_NAME!r}")
        with self._lock:  # the swap is atomic for concurrent infer() callers
            self._session, self.model_name, self.version = session, model_name, str(version)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        session = self._session
        if session is None:
            raise BackendError("no model loaded")
        return session.run([OUTPUT_NAME], {INPUT_NAME: check_batch(batch)})[0]

    def unload(self) -> None:
        with self._lock:
            self._session, self.model_name, self.version = None, None, None


#: the precisions :class:`OpenVinoBackend` runs at: f32 reproduces the export (the parity gate's tolerance);
#: bf16 (AMX / AVX-512 BF16 CPUs) is a lower-precision variant that has to pass a Dice gate like INT8
OPENVINO_PRECISIONS = ("f32", "bf16")


class OpenVinoBackend:
    """The same ONNX export compiled by OpenVINO's CPU plugin, inside the calling process.

    Why next to ONNX Runtime: the models served here are 3-D UNets, and ONNX Runtime's CPU provider runs a
    3-D convolution as im2col + GEMM (its blocked NCHWc kernels are 2-D only), while OpenVINO compiles the
    graph to oneDNN's blocked 3-D convolutions with the norm and activation fused; on this project's CPUs it
    is the faster runtime for the same file and the same fp32 arithmetic (``make bench-inference``).

    ``precision="f32"`` (default) keeps fp32 arithmetic (OpenVINO would otherwise pick bf16 on an AMX CPU),
    so it reproduces PyTorch to the parity gate's tolerance. The batch axis stays dynamic in the file, but
    each batch size seen (the predictor sends ``sw_batch_size`` windows and one remainder) gets its own
    statically shaped compilation, which OpenVINO runs faster than a dynamic one; at most
    ``max_compiled`` of them are kept. ``threads`` is the size of its pool (what PyTorch and ONNX Runtime
    get in a comparison); no CPU pinning, because the cores are shared with the predictor's stitching and
    other work. ``infer`` is safe to call from several threads (one infer request per call).
    """

    def __init__(self, threads: int | None = None, precision: str = "f32", max_compiled: int = 8) -> None:
        if precision not in OPENVINO_PRECISIONS:
            raise ValueError(f"precision must be one of {OPENVINO_PRECISIONS}, got {precision!r}")
        self.threads = threads
        self.precision = precision
        self.max_compiled = max(1, max_compiled)
        self.model_name: str | None = None
        self.version: str | None = None
        self._core: Any = None
        self._model: Any = None
        self._compiled: dict[int, Any] = {}
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self._model is not None

    @property
    def input_shape(self) -> tuple[int | str, ...]:
        """The loaded model's input shape (the batch axis as ``"batch"``, the window size as integers)."""
        model = self._model
        if model is None:
            raise BackendError("no model loaded")
        shape = model.input(INPUT_NAME).get_partial_shape()
        return tuple(int(d.get_length()) if d.is_static else "batch" for d in shape)

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": self.precision,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "ENABLE_CPU_PINNING": False,
        }
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = int(self.threads)
        return config

    def load(self, model_name: str, version: int | str, path: str | Path | None = None) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise BackendError("the OpenVINO backend needs the openvino package (requirements.txt)") from exc

        onnx_path = _resolve_onnx(model_name, version, path)
        core = ov.Core()
        try:
            model = core.read_model(str(onnx_path))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own for bad files
            raise BackendError(f"OpenVINO could not read {onnx_path}: {exc}") from exc
        names = {name for port in model.inputs for name in port.get_names()}
        if INPUT_NAME not in names:
            raise BackendError(f"{onnx_path} has inputs {sorted(names)}, expected {INPUT_NAME!r}")
        with self._lock:  # the swap is atomic for concurrent infer() callers
            self._core, self._model, self._compiled = core, model, {}
            self.model_name, self.version = model_name, str(version)

    def _compiled_for(self, batch_size: int) -> Any:
        with self._lock:
            model = self._model
            if model is None:
                raise BackendError("no model loaded")
            compiled = self._compiled.get(batch_size)
            if compiled is not None:
                return compiled
            shaped = model.clone()
            window = [int(d.get_length()) for d in list(shaped.input(INPUT_NAME).get_partial_shape())[1:]]
            shaped.reshape({INPUT_NAME: [batch_size, *window]})
            compiled = self._core.compile_model(shaped, "CPU", self._config())
            if len(self._compiled) >= self.max_compiled:
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[batch_size] = compiled
            return compiled

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if self._model is None:
            raise BackendError("no model loaded")
        batch = check_batch(batch)
        request = self._compiled_for(int(batch.shape[0])).create_infer_request()
        result = request.infer({INPUT_NAME: batch})  # copies the outputs out of the request's buffers
        return np.asarray(result[OUTPUT_NAME])

    def unload(self) -> None:
        with self._lock:
            self._model, self._compiled, self.model_name, self.version = None, {}, None, None


class TorchModuleBackend:
    """A PyTorch network inside the calling process: what evaluation runs before (or without) an export.

    Why a backend rather than calling the network directly: the predictor around it is the serving one,
    so windows, blending and post-processing are the inference service's, and only ``infer`` differs.
    ``load`` is a no-op (the module is given); ``device`` defaults to the module's own.
    """

    def __init__(self, network: torch.nn.Module, device: str | torch.device | None = None) -> None:
        import torch

        if device is not None:
            network = network.to(device)
        parameter = next(network.parameters(), None)
        self.device = parameter.device if parameter is not None else torch.device(device or "cpu")
        self.network: torch.nn.Module | None = network
        self.model_name: str | None = None
        self.version: str | None = None

    @property
    def ready(self) -> bool:
        return self.network is not None

    def load(self, model_name: str, version: int | str, path: str | Path | None = None) -> None:
        if self.network is None:
            raise BackendError("the PyTorch backend was unloaded: build a new one with the network")
        self.model_name, self.version = model_name, str(version)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        import torch

        network = self.network
        if network is None:
            raise BackendError("no model loaded")
        was_training = network.training
        network.eval()  # dropout and batch statistics as at serving, whatever mode the caller left it in
        try:
            with torch.inference_mode():
                logits = network(torch.from_numpy(check_batch(batch)).to(self.device))
        finally:
            network.train(was_training)
        return np.asarray(logits.detach().to(torch.float32).cpu().numpy())

    def unload(self) -> None:
        self.network, self.model_name, self.version = None, None, None
