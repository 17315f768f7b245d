"""Turn a registered PyTorch model into what the servers run: TorchScript, ONNX, TensorRT, a Triton repo.

Nothing is attached to a registry version unless the ONNX model reproduces the PyTorch one on sample
cases (the parity gate): the largest absolute logit difference over whole-volume sliding-window
predictions, and the Dice overlap of the two argmax label maps per case. A model that drifts in export
(an unsupported op, a normalisation that traces differently) is stopped here rather than in a hospital.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from services.inference.triton_repository import (
    config_from_onnx,
    flavour_for,
    model_versions,
    prune_model_versions,
    write_model_version,
)
from shared.contracts import artifacts
from shared.inference import INPUT_NAME, OUTPUT_NAME, OnnxRuntimeBackend, SlidingWindowPredictor

if TYPE_CHECKING:
    from shared.storage import ObjectStore

log = logging.getLogger(__name__)

#: ONNX opset: supported by onnxruntime 1.31 and by TensorRT 10's ONNX parser
ONNX_OPSET = 17
#: hippocampus volumes padded to this size are what the reference network is trained on
DEFAULT_ROI = (48, 64, 48)


class ExportError(RuntimeError):
    """The model could not be exported, or its export is not faithful (see ParityGateError)."""


class ParityGateError(ExportError):
    """The exported model does not reproduce PyTorch on the sample cases; nothing was attached."""

    def __init__(self, report: ParityReport) -> None:
        super().__init__(f"parity gate failed: {report.summary()}")
        self.report = report


@dataclass(frozen=True)
class ParityReport:
    max_abs_logit_diff: float
    per_case_dice: list[float]
    passed: bool
    tolerance: float = 1e-3
    min_dice: float = 0.99

    def summary(self) -> str:
        worst = min(self.per_case_dice) if self.per_case_dice else float("nan")
        return (
            f"max |logit diff| {self.max_abs_logit_diff:.3g} (tolerance {self.tolerance:g}), "
            f"worst case Dice {worst:.4f} (minimum {self.min_dice:g}) over {len(self.per_case_dice)} cases: "
            + ("passed" if self.passed else "FAILED")
        )


@dataclass(frozen=True)
class TensorRTOutcome:
    """Result of asking for a TensorRT engine: built, or why not (then the ONNX path serves)."""

    built: bool
    reason: str
    engine_path: Path | None = None
    precision: str = "fp16"


@dataclass(frozen=True)
class Int8Outcome:
    """Result of asking for an INT8 version: not asked, or quantised and gated against its fp32 parent.

    The gate: on every parity case the INT8 label map overlaps the fp32 one with Dice at least
    ``1 - max_dice_loss`` (the parity cases are the held-out test split of the model's dataset version).
    Only a passing INT8 model is attached (``model/onnx-int8``) and written as the Triton version; a
    failing one is reported here and the fp32 model is served, as an engine TensorRT cannot build is.
    """

    requested: bool
    passed: bool
    reason: str
    per_case_dice: list[float] = field(default_factory=list)
    max_dice_loss: float = 0.01
    onnx_path: Path | None = None
    fp32_bytes: int = 0
    int8_bytes: int = 0


@dataclass
class ExportResult:
    model_name: str
    version: int
    parity: ParityReport
    onnx_path: Path
    torchscript_path: Path
    tensorrt: TensorRTOutcome
    triton_keys: list[str] = field(default_factory=list)
    attached: list[str] = field(default_factory=list)
    #: Triton versions removed from the repository by the retention rule (export_registered_model)
    pruned_versions: list[int] = field(default_factory=list)
    int8: Int8Outcome = field(default_factory=lambda: Int8Outcome(False, False, "not requested"))


# ---------------------------------------------------------------------------------------------- helpers


def network_in_channels(network: torch.nn.Module) -> int:
    """Input channels of a convolutional network: those of its first convolution."""
    for module in network.modules():
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            return int(module.in_channels)
    raise ExportError(f"{type(network).__name__} has no convolution; cannot tell its input channels")


def label_dice(pred_a: np.ndarray, pred_b: np.ndarray, num_classes: int) -> float:
    """Mean foreground Dice between two label maps (a label absent from both counts as agreement, 1.0)."""
    from monai.metrics import compute_dice
    from monai.networks.utils import one_hot

    a = one_hot(torch.as_tensor(pred_a)[None, None].long(), num_classes)
    b = one_hot(torch.as_tensor(pred_b)[None, None].long(), num_classes)
    dice = compute_dice(a, b, include_background=False, ignore_empty=False)
    return float(dice.mean())


# ---------------------------------------------------------------------------------------------- exports


def export_torchscript(network: torch.nn.Module, example: torch.Tensor, path: str | Path | None = None) -> Path:
    """Trace ``network`` (eval mode) on ``example`` and save it; the TorchScript artifact of a version."""
    path = Path(path) if path is not None else Path(tempfile.mkdtemp(prefix="vf-ts-")) / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    network = network.eval()
    with torch.no_grad():
        traced = torch.jit.trace(network, example, check_trace=False)
    traced.save(str(path))
    return path


def export_onnx(
    network: torch.nn.Module,
    in_channels: int,
    roi_size: Sequence[int],
    path: str | Path,
    opset: int = ONNX_OPSET,
) -> Path:
    """Export to ONNX with a dynamic batch axis and a fixed window size (what sliding windows send).

    Uses the TorchScript-based exporter (``dynamo=False``): it needs no onnxscript and gives a graph that
    onnxruntime and TensorRT both take. The result is checked with ``onnx.checker``.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    network = network.eval()
    example = torch.zeros(1, in_channels, *roi_size)
    try:
        with torch.no_grad():
            torch.onnx.export(
                network,
                (example,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset,
                dynamo=False,
            )
    except Exception as exc:
        raise ExportError(f"ONNX export of {type(network).__name__} failed: {exc}") from exc
    onnx.checker.check_model(str(path))
    return path


def parity_check(
    network: torch.nn.Module,
    onnx_path: str | Path,
    cases: Sequence[np.ndarray | torch.Tensor],
    tolerance: float = 1e-3,
    min_dice: float = 0.99,
    sw_batch_size: int = 4,
    overlap: float = 0.25,
) -> ParityReport:
    """Compare ONNX Runtime with PyTorch on whole cases ``(C, X, Y, Z)`` through the same sliding window.

    Both sides use MONAI's ``sliding_window_inference`` with the window size baked into the ONNX graph,
    so the comparison is what the service will actually compute, not one window.
    """
    if not cases:
        raise ExportError("the parity gate needs at least one sample case")
    backend = OnnxRuntimeBackend()
    backend.load("parity", 1, onnx_path)
    roi_size = tuple(int(s) for s in backend.input_shape[2:])
    predictor = SlidingWindowPredictor(backend, roi_size, sw_batch_size=sw_batch_size, overlap=overlap)
    network = network.eval()
    max_diff, dices = 0.0, []
    for case in cases:
        volume = torch.as_tensor(case, dtype=torch.float32)
        if volume.ndim != 4:
            raise ExportError(f"parity cases must be (C, X, Y, Z), got shape {tuple(volume.shape)}")
        with torch.no_grad():
            reference = sliding_window_inference(
                volume[None], roi_size, sw_batch_size, network, overlap=overlap, mode="gaussian"
            )
        assert isinstance(reference, torch.Tensor)
        exported = predictor(volume)
        max_diff = max(max_diff, float((reference - exported).abs().max()))
        num_classes = int(reference.shape[1])
        dices.append(label_dice(reference.argmax(1)[0].numpy(), exported.argmax(1)[0].numpy(), num_classes))
    backend.unload()
    passed = max_diff <= tolerance and min(dices) >= min_dice
    return ParityReport(max_diff, dices, passed, tolerance, min_dice)


def int8_gate(
    fp32_onnx: str | Path,
    cases: Sequence[np.ndarray | torch.Tensor],
    output_path: str | Path,
    calibration_cases: Sequence[np.ndarray | torch.Tensor] | None = None,
    max_dice_loss: float = 0.01,
    sw_batch_size: int = 8,
    overlap: float = 0.25,
) -> Int8Outcome:
    """Quantise ``fp32_onnx`` to INT8 (static QDQ, calibrated on ``calibration_cases``) and gate it.

    Both models run through the serving predictor on every case; the INT8 one passes when its label map
    keeps Dice >= ``1 - max_dice_loss`` against the fp32 parent's on each case.
    """
    from shared.inference.quantize import calibration_windows, quantize_int8

    if not cases:
        raise ExportError("the INT8 gate needs at least one case")
    parent = OnnxRuntimeBackend()
    parent.load("parent", 1, fp32_onnx)
    x, y, z = (int(s) for s in parent.input_shape[2:])
    roi_size = (x, y, z)
    calibration = [np.asarray(torch.as_tensor(c, dtype=torch.float32)) for c in (calibration_cases or cases)]
    int8_path = quantize_int8(fp32_onnx, output_path, calibration_windows(calibration, roi_size))
    child = OnnxRuntimeBackend()
    child.load("int8", 1, int8_path)
    dices = []
    for case in cases:
        volume = torch.as_tensor(case, dtype=torch.float32)
        reference = SlidingWindowPredictor(parent, roi_size, sw_batch_size, overlap)(volume)
        quantised = SlidingWindowPredictor(child, roi_size, sw_batch_size, overlap)(volume)
        classes = int(reference.shape[1])
        dices.append(label_dice(reference.argmax(1)[0].numpy(), quantised.argmax(1)[0].numpy(), classes))
    parent.unload()
    child.unload()
    passed = min(dices) >= 1 - max_dice_loss
    reason = (
        f"INT8 label Dice vs fp32 parent: worst case {min(dices):.4f} over {len(dices)} cases "
        f"(minimum {1 - max_dice_loss:.4f}): " + ("passed" if passed else "FAILED, serving fp32")
    )
    sizes = Path(fp32_onnx).stat().st_size, Path(int8_path).stat().st_size
    return Int8Outcome(True, passed, reason, dices, max_dice_loss, Path(int8_path), *sizes)


# ---------------------------------------------------------------------------------------------- TensorRT


def tensorrt_available() -> tuple[bool, str]:
    """(True, "") when the TensorRT Python package and a CUDA GPU are both present, else why not."""
    missing = []
    if importlib.util.find_spec("tensorrt") is None:
        missing.append("the tensorrt Python package is not installed")
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible")
    return (not missing, "; ".join(missing))


def build_tensorrt_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    fp16: bool = True,
    int8: bool = False,
    calibration_batches: Sequence[np.ndarray] | None = None,
    max_batch_size: int = 8,
    workspace_bytes: int = 4 << 30,
) -> TensorRTOutcome:
    """Build a serialized TensorRT engine (fp16; INT8 with entropy calibration as an option).

    On a machine without TensorRT or a GPU this returns ``built=False`` with the reason, and the caller
    serves the ONNX model instead — a CPU development machine is a normal case, not an error.
    """
    precision = "int8" if int8 else "fp16" if fp16 else "fp32"
    ok, why = tensorrt_available()
    if not ok:
        reason = f"TensorRT or GPU not available ({why}); using ONNX"
        log.info(reason)
        return TensorRTOutcome(False, reason, None, precision)
    if int8 and not calibration_batches:
        raise ExportError("INT8 needs calibration_batches (float32 arrays shaped like the model input)")
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    shape = tuple(network.get_input(0).shape)[1:]
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (1, *shape), (max(1, max_batch_size // 2), *shape), (max_batch_size, *shape))
    config.add_optimization_profile(profile)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = _entropy_calibrator(trt, calibration_batches or [], Path(engine_path))
        config.set_calibration_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path}; see the TensorRT log")
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    return TensorRTOutcome(True, f"TensorRT {trt.__version__} engine ({precision})", engine_path, precision)


def _entropy_calibrator(trt: Any, batches: Sequence[np.ndarray], engine_path: Path) -> Any:
    """INT8 entropy calibrator feeding the given batches through CUDA memory held by torch tensors."""

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            self.batches = [torch.as_tensor(np.ascontiguousarray(b, dtype=np.float32)) for b in batches]
            self.index = 0
            self.device: torch.Tensor | None = None
            self.cache = engine_path.with_suffix(".calibration")

        def get_batch_size(self) -> int:
            return int(self.batches[0].shape[0])

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.index >= len(self.batches):
                return None
            self.device = self.batches[self.index].cuda()
            self.index += 1
            return [int(self.device.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            return self.cache.read_bytes() if self.cache.exists() else None

        def write_calibration_cache(self, cache: bytes) -> None:
            self.cache.write_bytes(bytes(cache))

    return Calibrator()


# ---------------------------------------------------------------------------------------------- orchestration


def export_model_version(
    network: torch.nn.Module,
    *,
    model_name: str,
    version: int,
    cases: Sequence[np.ndarray | torch.Tensor],
    store: ObjectStore,
    attach: Callable[[Path, str], None],
    roi_size: Sequence[int] = DEFAULT_ROI,
    tolerance: float = 1e-3,
    min_dice: float = 0.99,
    gpu: bool | None = None,
    int8_calibration: Sequence[np.ndarray] | None = None,
    max_batch_size: int = 8,
    workdir: str | Path | None = None,
    quantize: str | None = None,
    calibration_cases: Sequence[np.ndarray | torch.Tensor] | None = None,
    max_dice_loss: float = 0.01,
) -> ExportResult:
    """Export, gate, then publish: attach exports to the version and write its Triton model version.

    ``attach(local_path, artifact_dir)`` puts a file into the registry version's artifacts (``model/onnx``,
    ``model/torchscript``). On a failed gate nothing is attached or written and ParityGateError says why.
    ``quantize="int8"`` (CPU serving; TensorRT INT8 on GPUs is ``int8_calibration``): the fp32 ONNX is
    quantised, calibrated on ``calibration_cases`` (training cases; default ``cases``), and gated by
    :func:`int8_gate`; a passing INT8 model is attached and is what the Triton version serves.
    """
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be 'int8' or None, got {quantize!r}")
    network = network.eval()
    in_channels = network_in_channels(network)
    work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="vf-export-"))
    onnx_path = export_onnx(network, in_channels, roi_size, work / "onnx" / artifacts.ONNX_FILE)
    torchscript_path = export_torchscript(
        network, torch.zeros(1, in_channels, *roi_size), work / "torchscript" / artifacts.TORCHSCRIPT_FILE
    )
    report = parity_check(network, onnx_path, cases, tolerance=tolerance, min_dice=min_dice)
    log.info("%s v%s: %s", model_name, version, report.summary())
    if not report.passed:
        raise ParityGateError(report)

    int8 = (
        int8_gate(onnx_path, cases, work / "onnx-int8" / artifacts.ONNX_FILE, calibration_cases, max_dice_loss)
        if quantize == "int8"
        else Int8Outcome(False, False, "not requested")
    )
    if int8.requested:
        log.info("%s v%s: %s", model_name, version, int8.reason)

    use_gpu = torch.cuda.is_available() if gpu is None else gpu
    tensorrt = (
        build_tensorrt_engine(
            onnx_path,
            work / "tensorrt" / artifacts.TENSORRT_FILE,
            int8=int8_calibration is not None,
            calibration_batches=int8_calibration,
            max_batch_size=max_batch_size,
        )
        if use_gpu
        else TensorRTOutcome(False, "no GPU in this cluster; using ONNX")
    )
    attached = []
    for path, artifact_dir in ((onnx_path, artifacts.ONNX_DIR), (torchscript_path, artifacts.TORCHSCRIPT_DIR)):
        attach(path, artifact_dir)
        attached.append(f"{artifact_dir}/{path.name}")
    if tensorrt.built and tensorrt.engine_path is not None:
        attach(tensorrt.engine_path, artifacts.TENSORRT_DIR)
        attached.append(f"{artifacts.TENSORRT_DIR}/{tensorrt.engine_path.name}")
    served_onnx = onnx_path
    if int8.passed and int8.onnx_path is not None:
        attach(int8.onnx_path, artifacts.ONNX_INT8_DIR)
        attached.append(f"{artifacts.ONNX_INT8_DIR}/{int8.onnx_path.name}")
        served_onnx = int8.onnx_path

    flavour, kind = flavour_for(gpu=use_gpu, has_engine=tensorrt.built)
    config = config_from_onnx(
        onnx_path,
        model_name,
        flavour=flavour,
        instance_kind=kind,
        max_batch_size=max_batch_size,
        preferred_batch_sizes=tuple(b for b in (max_batch_size // 2, max_batch_size) if b >= 1),
    )
    keys = write_model_version(store, config, version, onnx_path=served_onnx, engine_path=tensorrt.engine_path)
    return ExportResult(
        model_name, int(version), report, onnx_path, torchscript_path, tensorrt, keys, attached, int8=int8
    )


def export_registered_model(
    model_uri: str,
    store: ObjectStore,
    *,
    cases: Sequence[np.ndarray | torch.Tensor] | str | None = None,
    case_limit: int = 3,
    model_name: str | None = None,
    client: Any = None,
    retain_versions: int | None = 3,
    **kwargs: Any,
) -> ExportResult:
    """Export a registry version (``models:/name@alias`` or ``models:/name/N``) through the parity gate.

    The network is rebuilt by ``shared.registry.load_model`` (weights loaded strictly); the window is the
    one the model was validated with (``validation.roi_size`` of its stored training config) unless
    ``roi_size`` is given. ``cases``: arrays already preprocessed with the model's own spec, or where to
    read them (an MSD folder or a dataset version id, see :mod:`services.inference.parity_cases`; the first
    ``case_limit`` are used); None means the dataset version the model was trained on (its
    ``dataset_version`` tag). The Triton model takes the registered model's name (or ``model_name``) and
    the registry version number as its version, so a Triton version and a registry version are the same
    thing; the exports are attached to the version's run under ``model/``.

    Retention: a Triton that polls the repository serves every version it holds, so after the export the
    repository keeps the newest ``retain_versions`` versions and every version a registry alias points at
    (a rollback target stays loaded); older ones are pruned. None keeps everything.
    """
    from services.inference.parity_cases import ParityCasesError, is_dataset_version, load_parity_cases
    from shared.evaluation.runner import roi_size_of
    from shared.registry import as_registry

    registry = as_registry(client)
    loaded = registry.load_model(model_uri)
    registered, version = loaded.name, int(loaded.version.version)
    if cases is None:
        dataset_version = (loaded.version.tags or {}).get("dataset_version")
        if not dataset_version:
            raise ParityCasesError(f"{loaded.uri} has no dataset_version tag: give the parity cases (--cases)")
        cases = dataset_version
    if isinstance(cases, str):
        if kwargs.get("quantize") and "calibration_cases" not in kwargs and is_dataset_version(cases):
            # calibrate on training cases, gate on the held-out ones: the gate is not scored on what tuned it
            kwargs["calibration_cases"] = load_parity_cases(cases, loaded.spec, store, case_limit, parts=("train",))
        cases = load_parity_cases(cases, loaded.spec, store, case_limit)
    kwargs.setdefault("roi_size", roi_size_of(loaded.training_config_yaml))

    def attach(path: Path, artifact_dir: str) -> None:
        registry.attach_artifact(registered, version, path, artifact_dir)

    result = export_model_version(
        loaded.network,
        model_name=model_name or registered,
        version=version,
        cases=cases,
        store=store,
        attach=attach,
        **kwargs,
    )
    if retain_versions is not None:
        aliased = {int(v) for v in registry.model_aliases(registered).values()}
        newest = model_versions(store, result.model_name)[-retain_versions:] if retain_versions > 0 else []
        result.pruned_versions = prune_model_versions(store, result.model_name, {version, *newest, *aliased})
        if result.pruned_versions:
            log.info("%s: pruned Triton versions %s (retention)", result.model_name, result.pruned_versions)
    return result
