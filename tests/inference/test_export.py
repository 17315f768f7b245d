"""Export to TorchScript and ONNX, the parity gate, TensorRT's absence, and publishing to a real MLflow."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from services.inference.export import (
    ParityGateError,
    build_tensorrt_engine,
    export_model_version,
    export_onnx,
    export_torchscript,
    label_dice,
    network_in_channels,
    parity_check,
    tensorrt_available,
)
from services.inference.triton_repository import TritonModelConfig
from shared.storage import open_object_store
from tests.inference.helpers import ROI, hippocampus_cases, tiny_unet
from tests.service_harness import require_shared_data

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cases() -> list[np.ndarray]:
    return hippocampus_cases(require_shared_data())


def test_torchscript_export_reproduces_the_network(tmp_path: Path) -> None:
    network = tiny_unet(seed=2)
    path = export_torchscript(network, torch.zeros(1, 1, *ROI), tmp_path / "model.pt")
    loaded = torch.jit.load(str(path))
    x = torch.randn(2, 1, *ROI)  # another batch size than traced
    with torch.no_grad():
        assert torch.allclose(loaded(x), network(x), atol=1e-5)


def test_onnx_export_has_a_dynamic_batch_axis_and_fixed_window(tmp_path: Path) -> None:
    import onnx

    path = export_onnx(tiny_unet(), 1, ROI, tmp_path / "model.onnx")
    graph = onnx.load(str(path)).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, *ROI]
    assert [o.name for o in graph.output] == ["logits"]


def test_label_dice_is_overlap_of_foreground_labels() -> None:
    a = np.zeros((4, 4, 4), np.int64)
    b = a.copy()
    a[:2] = 1
    b[:1] = 1
    assert label_dice(a, a, 3) == 1.0  # label 2 absent from both counts as agreement
    assert label_dice(a, b, 2) == pytest.approx(2 * 16 / (32 + 16))


def test_parity_gate_passes_for_a_faithful_export(tmp_path: Path, cases: list[np.ndarray]) -> None:
    network = tiny_unet(seed=3)
    onnx_path = export_onnx(network, 1, ROI, tmp_path / "model.onnx")
    report = parity_check(network, onnx_path, cases, tolerance=1e-3)
    assert report.passed, report.summary()
    assert 0 < report.max_abs_logit_diff < 1e-3  # a real difference was measured, and it is small
    assert len(report.per_case_dice) == len(cases) and min(report.per_case_dice) > 0.99


def test_parity_gate_fails_when_the_export_is_not_the_model(tmp_path: Path, cases: list[np.ndarray]) -> None:
    onnx_path = export_onnx(tiny_unet(seed=3), 1, ROI, tmp_path / "model.onnx")
    report = parity_check(tiny_unet(seed=4), onnx_path, cases)
    assert not report.passed
    assert report.max_abs_logit_diff > 1e-2
    assert "FAILED" in report.summary()


def test_tensorrt_says_clearly_when_it_cannot_build(tmp_path: Path) -> None:
    """On the CPU development machines there is no TensorRT/GPU: the outcome says so and names ONNX."""
    available, _ = tensorrt_available()
    if available:
        pytest.skip("TensorRT and a GPU are present here; this test is about their absence")
    onnx_path = export_onnx(tiny_unet(), 1, ROI, tmp_path / "model.onnx")
    outcome = build_tensorrt_engine(onnx_path, tmp_path / "model.plan", fp16=True)
    assert not outcome.built and outcome.engine_path is None
    assert "TensorRT or GPU not available" in outcome.reason and "using ONNX" in outcome.reason
    assert not (tmp_path / "model.plan").exists()


def test_network_in_channels_reads_the_first_convolution() -> None:
    from monai.networks.nets import UNet

    assert network_in_channels(UNet(3, 2, 3, (4, 8), (2,))) == 2


def test_export_attaches_to_a_real_mlflow_run_only_after_the_gate(
    mlflow_uri: str, s3_url: str, tmp_path: Path, cases: list[np.ndarray]
) -> None:
    """A registry version's run gets model/onnx and model/torchscript, and the Triton repo is written.

    ``attach`` here logs to a real MLflow run with MlflowClient (what shared.registry.attach_artifact
    does for a registered version); export_registered_model wires the registry's own function.
    """
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    experiment = client.create_experiment(f"export-{tmp_path.name}")
    store = open_object_store(s3_url)

    good_run = client.create_run(experiment).info.run_id
    network = tiny_unet(seed=5)
    result = export_model_version(
        network,
        model_name="hippo-export",
        version=3,
        cases=cases[:1],
        store=store,
        attach=lambda path, artifact_dir: client.log_artifact(good_run, str(path), artifact_dir),
        roi_size=ROI,
        workdir=tmp_path / "good",
    )
    assert result.parity.passed and not result.tensorrt.built
    logged = {a.path for d in ("model/onnx", "model/torchscript") for a in client.list_artifacts(good_run, d)}
    assert logged == {"model/onnx/model.onnx", "model/torchscript/model.pt"}
    assert set(result.triton_keys) == {
        "triton/hippo-export/3/model.onnx",
        "triton/hippo-export/3/model.py",
        "triton/hippo-export/config.pbtxt",
    }
    config = TritonModelConfig.from_pbtxt(store.get_bytes("triton/hippo-export/config.pbtxt").decode())
    assert (config.flavour, config.instance_kind, config.roi_size, config.out_channels) == (
        "python_onnx",
        "KIND_CPU",
        ROI,
        3,
    )

    bad_run = client.create_run(experiment).info.run_id

    class Drifted(torch.nn.Module):
        """Exports differently from how it runs in PyTorch: what the gate exists to catch."""

        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_unet(seed=6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.net(x)
            return out if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() else out * 1.5

    with pytest.raises(ParityGateError, match="parity gate failed") as failure:
        export_model_version(
            Drifted(),
            model_name="hippo-drifted",
            version=1,
            cases=cases[:1],
            store=store,
            attach=lambda path, artifact_dir: client.log_artifact(bad_run, str(path), artifact_dir),
            roi_size=ROI,
            workdir=tmp_path / "bad",
        )
    assert not failure.value.report.passed
    assert client.list_artifacts(bad_run) == []
    assert list(store.list("triton/hippo-drifted/")) == []


@pytest.fixture
def export_service(mlflow_uri: str, base_settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The inference API with a real Celery worker on its queue, found by the CLI through its variables."""
    from celery.contrib.testing.worker import start_worker

    import services.inference.tasks  # noqa: F401  (registers the tasks with the app the worker serves)
    from services.inference import worker
    from tests.inference.conftest import running_service

    settings = {**base_settings, "mlflow_tracking_uri": mlflow_uri, "backend": "onnxruntime"}
    with running_service(settings, None) as svc:
        worker.use_context(svc.ctx)
        monkeypatch.setenv("VOXELFLOW_INFERENCE_API_URL", svc.url)
        monkeypatch.setenv("VOXELFLOW_TOKEN", svc.tokens["operator"])
        with start_worker(svc.ctx.celery, queues=["inference"], perform_ping_check=False, shutdown_timeout=30):
            yield


def test_models_export_cli_on_a_registered_version(
    mlflow_uri: str,
    s3_url: str,
    tmp_path: Path,
    export_service: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``voxelflow models export`` (a client of ``POST /v1/model-exports``): a version registered through
    shared.registry gets model/onnx and model/torchscript on its run after the gate passed on real
    hippocampus cases preprocessed with the model's own spec, and its Triton model version is in object
    storage."""
    from shared.cli import main
    from shared.inference import OnnxRuntimeBackend
    from shared.registry import load_model, registry_client
    from tests.inference.registry_models import register_tiny_model, unique_model_name

    client = registry_client(mlflow_uri)
    name = unique_model_name("export-cli")
    version = register_tiny_model(client, name, seed=7)
    uri = f"models:/{name}/{version}"
    run_id = str(client.get_model_version(name, str(version)).run_id)
    msd = str(require_shared_data() / "msd_task04_hippocampus")

    # no --cases: the version's dataset version is not in this storage, so the export refuses, clearly
    with pytest.raises(SystemExit) as refused:
        main(["models", "export", "--model", uri])
    assert "ds-00000000deadbeef" in str(refused.value.code) and "not found" in str(refused.value.code)
    with pytest.raises(SystemExit) as unknown:
        main(["models", "export", "--model", f"models:/{name}/99", "--cases", msd])
    assert "voxelflow models export" in str(unknown.value.code)
    assert client.list_artifacts(run_id, "model/onnx") == []

    main(["models", "export", "--model", uri, "--cases", msd, "--limit", "2"])
    out = capsys.readouterr().out
    assert f"{name} v{version}: parity" in out and "over 2 cases: passed" in out
    attached = {a.path for d in ("model/onnx", "model/torchscript") for a in client.list_artifacts(run_id, d)}
    assert attached == {"model/onnx/model.onnx", "model/torchscript/model.pt"}
    store = open_object_store(s3_url)
    assert set(store.list(f"triton/{name}/")) == {
        f"triton/{name}/config.pbtxt",
        f"triton/{name}/{version}/model.onnx",
        f"triton/{name}/{version}/model.py",
    }
    config = TritonModelConfig.from_pbtxt(store.get_bytes(f"triton/{name}/config.pbtxt").decode())
    assert (config.flavour, config.roi_size, config.in_channels, config.out_channels) == (
        "python_onnx",
        (32, 32, 32),  # the model's validation window, from its stored training config
        1,
        3,
    )
    # the attached ONNX is the registered network: same logits as load_model's PyTorch network
    onnx_path = client.download_artifacts(run_id, "model/onnx/model.onnx", str(tmp_path))
    backend = OnnxRuntimeBackend(intra_op_threads=1)
    backend.load(name, version, onnx_path)
    window = np.random.default_rng(1).standard_normal((2, 1, 32, 32, 32), dtype=np.float32)
    with torch.no_grad():
        expected = load_model(uri, client=client).network(torch.from_numpy(window)).numpy()
    np.testing.assert_allclose(backend.infer(window), expected, atol=1e-4)


def test_int8_export_is_served_only_when_it_keeps_the_parents_dice(
    s3_url: str, tmp_path: Path, cases: list[np.ndarray]
) -> None:
    """quantize="int8": a static-QDQ model gated against its fp32 parent; the Triton version serves it
    only when the gate passes, otherwise the fp32 model is served and nothing INT8 is attached."""
    import onnx

    store = open_object_store(s3_url)
    network = tiny_unet(seed=7)

    def export(name: str, max_dice_loss: float, attached: list[str]) -> Any:
        return export_model_version(
            network,
            model_name=name,
            version=1,
            cases=cases[:1],
            store=store,
            attach=lambda path, artifact_dir: attached.append(f"{artifact_dir}/{path.name}"),
            roi_size=ROI,
            workdir=tmp_path / name,
            quantize="int8",
            calibration_cases=cases[1:],
            max_dice_loss=max_dice_loss,
        )

    loose: list[str] = []
    result = export("hippo-int8", 1.0, loose)
    assert result.int8.requested and result.int8.passed, result.int8.reason
    (dice,) = result.int8.per_case_dice
    assert 0.5 < dice < 1.0  # quantisation changes some labels (so the strict gate below can fail)
    assert "model/onnx-int8/model.onnx" in loose and "model/onnx/model.onnx" in loose
    served = onnx.load_from_string(store.get_bytes("triton/hippo-int8/1/model.onnx"))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in served.graph.node}

    strict: list[str] = []
    refused = export("hippo-int8-strict", (1.0 - dice) / 2, strict)
    assert refused.int8.requested and not refused.int8.passed and "FAILED, serving fp32" in refused.int8.reason
    assert refused.int8.per_case_dice == [dice]  # deterministic: same model, same calibration, same case
    assert not any("onnx-int8" in a for a in strict)
    served = onnx.load_from_string(store.get_bytes("triton/hippo-int8-strict/1/model.onnx"))
    assert "QuantizeLinear" not in {node.op_type for node in served.graph.node}

    with pytest.raises(ValueError, match="quantize must be"):
        export_model_version(
            network, model_name="x", version=1, cases=cases[:1], store=store, attach=lambda p, d: None, quantize="fp8"
        )
