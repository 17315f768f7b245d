"""A real tritonserver (the CPU build from nvidia-pytriton) serving models written to real S3.

The repository goes to SeaweedFS under ``triton/``, is synced into the directory the server reads, and is
loaded/unloaded through Triton's model-control API — the same steps as when a registry alias moves.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from services.inference.backends import TritonBackend
from services.inference.export import export_onnx
from services.inference.triton_repository import (
    TritonModelConfig,
    config_from_onnx,
    model_versions,
    prune_model_versions,
    write_model_version,
)
from shared.inference import BackendError, OnnxRuntimeBackend, SlidingWindowPredictor
from shared.storage import ObjectStore, open_object_store
from tests.conftest import TritonServer
from tests.inference.helpers import ROI, hippocampus_cases, tiny_unet
from tests.service_harness import require_shared_data

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
    stored = TritonModelConfig("hippo", 1, 3, ROI, all_versions=True)  # what write_model_version stores
    assert "version_policy {\n  all {\n  }\n}" in stored.to_pbtxt()
    parsed = TritonModelConfig.from_pbtxt(stored.to_pbtxt())
    assert parsed.all_versions and parsed.versions is None and parsed.to_pbtxt() == stored.to_pbtxt()
    assert stored.with_versions([2]).to_json()["version_policy"] == {"specific": {"versions": ["2"]}}  # int64 in JSON
    with pytest.raises(ValueError, match="GPU instances only"):
        TritonModelConfig("hippo", 1, 3, ROI, flavour="tensorrt_plan")
    with pytest.raises(ValueError, match="preferred batch sizes"):
        TritonModelConfig("hippo", 1, 3, ROI, max_batch_size=4, preferred_batch_sizes=(8,))


@dataclass(frozen=True)
class PollingTriton:
    url: str
    repository: Path


@pytest.fixture(scope="module")
def polling_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PollingTriton]:
    """A second real tritonserver, run as the chart runs the cluster's shared one: ``--model-control-mode=poll``
    (every second here), reading a repository it loads everything from."""
    import subprocess
    import sys

    import tritonclient.grpc as grpcclient

    from tests.service_harness import free_port

    root = tmp_path_factory.mktemp("polling-triton")
    repository = root / "models"
    repository.mkdir()
    http, grpc, metrics = free_port(), free_port(), free_port()
    log = open(root / "triton.log", "wb")  # noqa: SIM115 - owned by the server process
    venv = os.environ.get("VOXELFLOW_TRITON_VENV", str(Path(__file__).resolve().parents[2] / ".venv-triton"))
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shared.stack.triton",
            f"--venv={venv}",
            f"--repository={repository}",
            f"--backends-dir={root / 'backends'}",
            f"--http-port={http}",
            f"--grpc-port={grpc}",
            f"--metrics-port={metrics}",
            "--model-control=poll",
            "--repository-poll-secs=1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if client.is_server_ready(client_timeout=2):
                    break
            except Exception:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"polling tritonserver did not start:\n{(root / 'triton.log').read_text()[-3000:]}")
            time.sleep(0.2)
        yield PollingTriton(f"127.0.0.1:{grpc}", repository)
    finally:
        client.close()
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_a_shared_polling_triton_serves_every_replica_through_a_version_swap(
    polling_triton: PollingTriton, store: ObjectStore, tmp_path: Path
) -> None:
    """The cluster case: several inference replicas share one Triton (or a Deployment of them, scaled by its
    HPA). A replica that moves to a new version must not unload the one another replica still serves."""
    name = "hippo-shared"

    def replica(timeout_s: float = 60, settle_s: float = 0.0) -> TritonBackend:
        return TritonBackend(
            polling_triton.url,
            repository_dir=polling_triton.repository,
            store=store,
            model_control="poll",
            timeout_s=timeout_s,
            poll_settle_s=settle_s,
        )

    batch = np.random.default_rng(1).standard_normal((2, 1, *ROI), dtype=np.float32)
    net_v1 = publish(store, tmp_path, name, 1, seed=20)
    # one backend per served version, as RegistryModelSource keeps them: replicas A and B both serve v1
    a_v1, b_v1, a_v2, b_v2 = replica(), replica(), replica(settle_s=1.0), replica()
    try:
        a_v1.load(name, 1)  # nothing is asked of the server: it loads v1 from its repository on its own
        b_v1.load(name, 1)
        with torch.no_grad():
            expected_v1 = net_v1(torch.from_numpy(batch)).numpy()
            expected_v2 = publish(store, tmp_path, name, 2, seed=21)(torch.from_numpy(batch)).numpy()
        # the alias moves; replica A sees it first: it loads v2 and lets v1 go
        started = time.monotonic()
        a_v2.load(name, 2)
        assert time.monotonic() - started >= 1.0  # ready, then one settle period for the other Triton pods
        a_v1.release()
        np.testing.assert_allclose(a_v2.infer(batch), expected_v2, atol=1e-4)
        np.testing.assert_allclose(b_v1.infer(batch), expected_v1, atol=1e-4)  # B, not yet moved, still serves v1
        assert a_v2.client.is_model_ready(name, "1")

        # retention prunes v1 from the repository: the server unloads it at its next poll, never a replica
        assert prune_model_versions(store, name, keep={2}) == [1]
        assert model_versions(store, name) == [2]
        b_v2.load(name, 2)  # syncs the mirror (v1 leaves it too) and finds v2 ready
        b_v1.release()
        deadline = time.monotonic() + 30
        while b_v2.client.is_model_ready(name, "1") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not b_v2.client.is_model_ready(name, "1")
        np.testing.assert_allclose(b_v2.infer(batch), expected_v2, atol=1e-4)
        impatient = replica(timeout_s=2)
        with pytest.raises(BackendError, match="poll mode: the server loads what its repository holds"):
            impatient.load(name, 7)  # never exported: a clear error after the timeout, not a hang
        impatient.close()
    finally:
        for backend in (a_v1, b_v1, a_v2, b_v2):
            backend.unload()  # poll mode: forgets the version, unloads nothing on the shared server
            backend.close()


def test_triton_serves_a_gated_int8_export_like_the_embedded_int8_model(
    triton: TritonBackend, store: ObjectStore, tmp_path: Path
) -> None:
    """The INT8 version an export writes loads in the real tritonserver and answers as ONNX Runtime
    in process does with the same INT8 file (the QDQ graph runs in Triton's ONNX Runtime too)."""
    from services.inference.export import export_model_version

    cases = hippocampus_cases(require_shared_data())
    result = export_model_version(
        tiny_unet(seed=14),
        model_name="hippo-int8",
        version=1,
        cases=cases[:1],
        store=store,
        attach=lambda path, artifact_dir: None,
        roi_size=ROI,
        workdir=tmp_path,
        quantize="int8",
        calibration_cases=cases[1:],
        max_dice_loss=1.0,
        max_batch_size=4,
    )
    assert result.int8.passed and result.int8.onnx_path is not None
    triton.load("hippo-int8", 1)
    embedded = OnnxRuntimeBackend(intra_op_threads=1)
    embedded.load("hippo-int8", 1, result.int8.onnx_path)
    via_triton = SlidingWindowPredictor(triton, ROI, sw_batch_size=4)(cases[0])
    via_embedded = SlidingWindowPredictor(embedded, ROI, sw_batch_size=4)(cases[0])
    assert float((via_triton - via_embedded).abs().max()) < 1e-4
