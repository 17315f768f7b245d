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
