"""The embedded ONNX Runtime and OpenVINO backends and the sliding-window predictor on real hippocampus volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from services.inference.export import export_onnx
from shared.inference import (
    BackendError,
    InferenceBackend,
    OnnxRuntimeBackend,
    OpenVinoBackend,
    SlidingWindowPredictor,
    TorchModuleBackend,
)
from tests.inference.helpers import ROI, hippocampus_cases, tiny_unet
from tests.service_harness import require_shared_data

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    network = tiny_unet(seed=1)
    return network, export_onnx(network, 1, ROI, tmp_path_factory.mktemp("onnx") / "model.onnx")


def test_onnxruntime_backend_matches_pytorch_for_several_batch_sizes(exported: tuple[torch.nn.Module, Path]) -> None:
    network, onnx_path = exported
    backend = OnnxRuntimeBackend(intra_op_threads=1)
    assert isinstance(backend, InferenceBackend)
    assert not backend.ready
    backend.load("hippo", 1, onnx_path)
    assert backend.ready
    rng = np.random.default_rng(0)
    for batch_size in (1, 3):  # the batch axis is dynamic
        batch = rng.standard_normal((batch_size, 1, *ROI), dtype=np.float32)
        logits = backend.infer(batch)
        with torch.no_grad():
            expected = network(torch.from_numpy(batch)).numpy()
        assert logits.shape == (batch_size, 3, *ROI)
        np.testing.assert_allclose(logits, expected, atol=1e-4)
    backend.unload()
    assert not backend.ready
    with pytest.raises(BackendError, match="no model loaded"):
        backend.infer(np.zeros((1, 1, *ROI), np.float32))


def test_onnxruntime_backend_loads_from_a_repository_layout(
    exported: tuple[torch.nn.Module, Path], tmp_path: Path
) -> None:
    _, onnx_path = exported
    (tmp_path / "hippo" / "7").mkdir(parents=True)
    (tmp_path / "hippo" / "7" / "model.onnx").write_bytes(onnx_path.read_bytes())
    backend = OnnxRuntimeBackend()
    backend.load("hippo", 7, tmp_path)
    assert backend.version == "7"
    with pytest.raises(BackendError, match="no ONNX model"):
        backend.load("hippo", 8, tmp_path)
    assert backend.version == "7" and backend.ready  # a failed load leaves the served model in place


def test_bad_batches_are_refused_clearly(exported: tuple[torch.nn.Module, Path]) -> None:
    backend = OnnxRuntimeBackend()
    backend.load("hippo", 1, exported[1])
    with pytest.raises(BackendError, match="5-D"):
        backend.infer(np.zeros((1, *ROI), np.float32))
    with pytest.raises(BackendError, match="NaN"):
        backend.infer(np.full((1, 1, *ROI), np.nan, np.float32))
    with pytest.raises(BackendError, match="floating point"):
        backend.infer(np.zeros((1, 1, *ROI), np.int16))
    with pytest.raises(BackendError, match="could not load"):
        broken = exported[1].parent / "broken.onnx"
        broken.write_bytes(b"not an onnx model")
        backend.load("hippo", 2, broken)


def test_sliding_window_predictor_equals_monai_in_pytorch_on_hippocampus(
    exported: tuple[torch.nn.Module, Path],
) -> None:
    """The shared code path: backend windows blended by MONAI give PyTorch's whole-volume logits."""
    network, onnx_path = exported
    backend = OnnxRuntimeBackend(intra_op_threads=1)
    backend.load("hippo", 1, onnx_path)
    predictor = SlidingWindowPredictor(backend, ROI, sw_batch_size=3, overlap=0.25)
    (case,) = hippocampus_cases(require_shared_data(), ("hippocampus_004",))
    logits = predictor(case)
    with torch.no_grad():
        expected = sliding_window_inference(
            torch.from_numpy(case)[None], ROI, 3, network, overlap=0.25, mode="gaussian"
        )
    assert isinstance(expected, torch.Tensor)
    assert logits.shape == (1, 3, *case.shape[1:])
    assert float((logits - expected).abs().max()) < 1e-3
    assert torch.equal(logits.argmax(1), expected.argmax(1))
    assert predictor.windows_processed > 1  # the volume is larger than one window
    with pytest.raises(ValueError, match="volume must be"):
        predictor(case[0, 0])


def test_predictor_refuses_an_unloaded_backend() -> None:
    predictor = SlidingWindowPredictor(OnnxRuntimeBackend(), ROI)
    with pytest.raises(BackendError, match="no model loaded"):
        predictor(np.zeros((1, *ROI), np.float32))


@pytest.mark.parametrize(
    ("shape", "roi", "overlap", "mode", "images", "sw_batch_size"),
    [
        ((2, 40, 52, 37), (16, 16, 16), 0.25, "gaussian", 1, 4),  # several windows, a remainder batch
        ((2, 10, 30, 7), (16, 16, 16), 0.25, "gaussian", 1, 3),  # smaller than the window: padded, cropped
        ((2, 33, 17, 20), (16, 17, 8), 0.5, "constant", 2, 5),  # two images, batches across them
        ((2, 16, 16, 16), (16, 16, 16), 0.25, "gaussian", 1, 1),  # exactly one window
    ],
)
def test_predictor_blends_exactly_as_monai_sliding_window_inference(
    shape: tuple[int, ...], roi: tuple[int, int, int], overlap: float, mode: str, images: int, sw_batch_size: int
) -> None:
    """The predictor's own numpy stitching gives MONAI's result bit for bit (same windows, weights, order)."""
    torch.manual_seed(0)
    network = torch.nn.Sequential(
        torch.nn.Conv3d(2, 3, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(3, 3, 3, padding=1)
    ).eval()
    volume = np.random.default_rng(0).standard_normal((images, *shape), dtype=np.float32)
    predictor = SlidingWindowPredictor(TorchModuleBackend(network), roi, sw_batch_size, overlap, mode=mode)
    got = predictor(volume if images > 1 else volume[0])
    with torch.no_grad():
        expected = sliding_window_inference(
            torch.from_numpy(volume), roi, sw_batch_size, network, overlap=overlap, mode=mode
        )
    assert isinstance(expected, torch.Tensor)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.equal(got, expected)
    calls = predictor.batch_sizes(shape[1:], images)
    assert max(calls) <= sw_batch_size
    assert predictor.windows_processed % sw_batch_size in calls | {0}


def test_predictor_warm_up_calls_each_batch_size_once_and_counts_no_window() -> None:
    seen: list[int] = []

    class Recording(TorchModuleBackend):
        def infer(self, batch: np.ndarray) -> np.ndarray:
            seen.append(int(batch.shape[0]))
            return super().infer(batch)

    predictor = SlidingWindowPredictor(Recording(torch.nn.Conv3d(1, 2, 1).eval()), (16, 16, 16), sw_batch_size=5)
    assert predictor.batch_sizes((40, 52, 37)) == {5, 1}  # 3 x 4 x 3 = 36 windows: 7 calls of 5, one of 1
    assert predictor.batch_sizes((16, 16, 16)) == {1} and predictor.batch_sizes((40, 52, 37), images=2) == {5, 2}
    predictor.warm_up((40, 52, 37))
    assert sorted(seen) == [1, 5] and predictor.windows_processed == 0
    predictor(np.zeros((1, 40, 52, 37), np.float32))
    assert sorted(seen[2:]) == [1] + [5] * 7 and predictor.windows_processed == 36


@pytest.mark.parametrize("precision", ["f32", "bf16"])
def test_openvino_backend_runs_the_same_export(exported: tuple[torch.nn.Module, Path], precision: str) -> None:
    """OpenVINO compiles the ONNX export itself: fp32 reproduces PyTorch to the parity tolerance, bf16 keeps
    the labels of the whole-volume prediction nearly everywhere, every batch size works (each its own
    compilation), and bad input is refused like the other backends."""
    pytest.importorskip("openvino")
    network, onnx_path = exported
    backend = OpenVinoBackend(threads=1, precision=precision, max_compiled=2)
    assert isinstance(backend, InferenceBackend) and not backend.ready
    backend.load("hippo", 1, onnx_path)
    assert backend.ready and backend.input_shape == ("batch", 1, *ROI)
    rng = np.random.default_rng(0)
    for batch_size in (1, 3, 2, 3):  # more sizes than it keeps compiled
        batch = rng.standard_normal((batch_size, 1, *ROI), dtype=np.float32)
        logits = backend.infer(batch)
        with torch.no_grad():
            expected = network(torch.from_numpy(batch)).numpy()
        assert logits.shape == (batch_size, 3, *ROI) and logits.dtype == np.float32
        if precision == "f32":
            np.testing.assert_allclose(logits, expected, atol=1e-4)
    (case,) = hippocampus_cases(require_shared_data(), ("hippocampus_004",))
    predictor = SlidingWindowPredictor(backend, ROI, sw_batch_size=3)
    labels = predictor(case).argmax(1)
    with torch.no_grad():
        reference = sliding_window_inference(torch.from_numpy(case)[None], ROI, 3, network, mode="gaussian")
    assert isinstance(reference, torch.Tensor)
    agreement = float((labels == reference.argmax(1)).float().mean())
    assert agreement == 1.0 if precision == "f32" else agreement > 0.99
    with pytest.raises(BackendError, match="NaN"):
        backend.infer(np.full((1, 1, *ROI), np.nan, np.float32))
    with pytest.raises(BackendError, match="could not read"):
        broken = onnx_path.parent / "broken-ov.onnx"
        broken.write_bytes(b"not an onnx model")
        backend.load("hippo", 2, broken)
    assert backend.version == "1" and backend.ready  # a failed load leaves the served model in place
    backend.unload()
    with pytest.raises(BackendError, match="no model loaded"):
        backend.infer(np.zeros((1, 1, *ROI), np.float32))
    with pytest.raises(ValueError, match="precision"):
        OpenVinoBackend(precision="fp8")
