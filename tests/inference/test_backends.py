"""The embedded ONNX Runtime backend and the sliding-window predictor on real hippocampus volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from services.inference.export import export_onnx
from shared.inference import BackendError, InferenceBackend, OnnxRuntimeBackend, SlidingWindowPredictor
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
