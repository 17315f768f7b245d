"""A real tritonserver (the CPU build from nvidia-pytriton) serving models written to real S3.

The repository goes to SeaweedFS under ``triton/``, is synced into the directory the server reads, and is
loaded/unloaded through Triton's model-control API — the same steps as when a registry alias moves.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from services.inference.backends import BackendError, OnnxRuntimeBackend, TritonBackend
from services.inference.export import export_onnx
from services.inference.predictor import SlidingWindowPredictor
from services.inference.triton_repository import TritonModelConfig, config_from_onnx, write_model_version
from shared.storage import ObjectStore, open_object_store
from tests.conftest import TritonServer
from tests.inference.helpers import ROI, hippocampus_cases, require_shared_data, tiny_unet

torch.set_num_threads(1)


@pytest.fixture
def store(s3_url: str) -> ObjectStore:
    return open_object_store(s3_url)


@pytest.fixture
def triton(triton_server: TritonServer, store: ObjectStore) -> Iterator[TritonBackend]:
    backend = TritonBackend(triton_server.url, repository_dir=triton_server.model_repository, store=store)
    try:
        yield backend
    finally:
        backend.unload()
        backend.close()


def publish(store: ObjectStore, tmp_path: Path, name: str, version: int, seed: int) -> torch.nn.Module:
    network = tiny_unet(seed=seed)
    onnx_path = export_onnx(network, 1, ROI, tmp_path / f"{name}-{version}.onnx")
    write_model_version(
        store, config_from_onnx(onnx_path, name, max_batch_size=4, preferred_batch_sizes=(2, 4)), version, onnx_path
    )
    return network


def test_triton_serves_the_exported_model_and_swaps_versions(
    triton: TritonBackend, store: ObjectStore, tmp_path: Path
) -> None:
    net_v1 = publish(store, tmp_path, "hippo", 1, seed=10)
    assert not triton.ready
    triton.load("hippo", 1)
    assert triton.ready
    batch = np.random.default_rng(0).standard_normal((3, 1, *ROI), dtype=np.float32)
    with torch.no_grad():
        expected_v1 = net_v1(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(triton.infer(batch), expected_v1, atol=1e-4)

    # a second version appears in object storage: load it, it answers with the new weights, v1 is gone
    net_v2 = publish(store, tmp_path, "hippo", 2, seed=11)
    triton.load("hippo", 2)
    with torch.no_grad():
        expected_v2 = net_v2(torch.from_numpy(batch)).numpy()
    assert np.abs(expected_v2 - expected_v1).max() > 1e-2  # the two versions really differ
    np.testing.assert_allclose(triton.infer(batch), expected_v2, atol=1e-4)
    assert triton.client.is_model_ready("hippo", "2")
    assert not triton.client.is_model_ready("hippo", "1")
    states = {(m.name, m.version): m.state for m in triton.client.get_model_repository_index().models}
    assert states[("hippo", "2")] == "READY"

    triton.unload()
    assert not triton.ready
    with pytest.raises(BackendError, match="no model loaded"):
        triton.infer(batch)


def test_triton_and_embedded_onnxruntime_give_the_same_volume_prediction(
    triton: TritonBackend, store: ObjectStore, tmp_path: Path
) -> None:
    """Both backends under one SlidingWindowPredictor: the same logits on a real hippocampus volume."""
    publish(store, tmp_path, "hippo-sw", 1, seed=12)
    triton.load("hippo-sw", 1)
    embedded = OnnxRuntimeBackend(intra_op_threads=1)
    embedded.load("hippo-sw", 1, tmp_path / "hippo-sw-1.onnx")
    (case,) = hippocampus_cases(require_shared_data(), ("hippocampus_006",))
    via_triton = SlidingWindowPredictor(triton, ROI, sw_batch_size=4)(case)
    via_embedded = SlidingWindowPredictor(embedded, ROI, sw_batch_size=4)(case)
    assert via_triton.shape == (1, 3, *case.shape[1:])
    assert float((via_triton - via_embedded).abs().max()) < 1e-4


def test_triton_refuses_what_it_cannot_serve(triton: TritonBackend, store: ObjectStore, tmp_path: Path) -> None:
    publish(store, tmp_path, "hippo-bad", 1, seed=13)
    with pytest.raises(BackendError, match="refused to load"):
        triton.load("hippo-bad", 5)  # no such version in the repository
    assert not triton.ready
    triton.load("hippo-bad", 1)
    with pytest.raises(BackendError, match="inference failed"):
        triton.infer(np.zeros((1, 1, 8, 8, 8), np.float32))  # not the window size the model declares
    with pytest.raises(FileNotFoundError, match="no Triton model"):
        triton.load("never-published", 1)


def test_config_pbtxt_round_trips_through_tritons_model_config_proto() -> None:
    gpu = TritonModelConfig(
        "hippo", 1, 3, ROI, flavour="tensorrt_plan", instance_kind="KIND_GPU", instance_count=2, versions=(4,)
    )
    text = gpu.to_pbtxt()
    assert 'platform: "tensorrt_plan"' in text and "KIND_GPU" in text and "dynamic_batching" in text
    assert TritonModelConfig.from_pbtxt(text) == gpu
    cpu = TritonModelConfig("hippo", 1, 3, ROI)
    assert 'backend: "python"' in cpu.to_pbtxt() and "max_batch_size: 8" in cpu.to_pbtxt()
    with pytest.raises(ValueError, match="GPU instances only"):
        TritonModelConfig("hippo", 1, 3, ROI, flavour="tensorrt_plan")
    with pytest.raises(ValueError, match="preferred batch sizes"):
        TritonModelConfig("hippo", 1, 3, ROI, max_batch_size=4, preferred_batch_sizes=(8,))
