"""The inference service serving real registry versions: MLflow (shared.registry) → exports → a backend.

Everything is real: versions are registered in the session's MLflow, exported through the parity gate
(``export_registered_model``) to their runs and to ``triton/`` in SeaweedFS, and served by the service's
own ``RegistryModelSource`` over embedded ONNX Runtime or the CPU tritonserver. Only the network weights
are random (a tiny UNet; parity and routing do not need a trained model).
"""

from __future__ import annotations

import gzip
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from services.inference.export import export_registered_model
from services.inference.model_lifecycle import routes_to_candidate
from shared.pseudonyms import pseudonymise_patient_id
from shared.registry import load_model, registry_client, set_alias
from shared.storage import open_object_store
from tests.inference.conftest import InferenceService, running_service
from tests.inference.registry_models import register_tiny_model, unique_model_name

torch.set_num_threads(1)

BACKENDS = ["onnxruntime", "triton"]


@dataclass(frozen=True)
class Registered:
    name: str
    client: Any
    tracking_uri: str
    exported: tuple[int, int]  # two versions with exports (different weights)
    unexported: int  # a version registered but never exported


@pytest.fixture(scope="module")
def registered(mlflow_uri: str, s3_url: str, shared_data: Path) -> Registered:
    client = registry_client(mlflow_uri)
    name = unique_model_name("served")
    store = open_object_store(s3_url)
    msd = str(shared_data / "msd_task04_hippocampus")
    exported = []
    for seed in (1, 2):
        version = register_tiny_model(client, name, seed=seed)
        result = export_registered_model(f"models:/{name}/{version}", store, cases=msd, case_limit=1, client=client)
        assert result.parity.passed
        exported.append(version)
    unexported = register_tiny_model(client, name, seed=3)
    return Registered(name, client, mlflow_uri, (exported[0], exported[1]), unexported)


@pytest.fixture(scope="module")
def hippocampus_path(shared_data: Path) -> Path:
    return shared_data / "msd_task04_hippocampus" / "imagesTr" / "hippocampus_004.nii.gz"


def service_settings(
    request: pytest.FixtureRequest, base_settings: dict[str, Any], registered: Registered, backend: str
) -> dict[str, Any]:
    settings = {
        **base_settings,
        "model_name": registered.name,
        "backend": backend,
        "mlflow_tracking_uri": registered.tracking_uri,
        "onnxruntime_threads": 1,
        "sw_batch_size": 4,
    }
    if backend == "triton":
        triton = request.getfixturevalue("triton_server")
        settings.update(triton_url=triton.url, triton_model_repository=str(triton.model_repository))
    return settings


def segment(svc: InferenceService, data: bytes, **fields: str) -> Any:
    with svc.client() as client:
        return client.post("/v1/segmentations", files={"file": ("image.nii.gz", data)}, data=fields)


def reference_mask(uri: str, image_path: Path) -> np.ndarray:
    """What the registered PyTorch network predicts for the image, on its grid: the evaluation code path
    (``shared.evaluation.runner``: the shared pipeline over the PyTorch network) — no service code."""
    from shared.inference import SlidingWindowPredictor, TorchModuleBackend, read_nifti, segment_array
    from shared.preprocessing import build_transforms

    loaded = load_model(uri)
    transforms = build_transforms(loaded.spec, "inference", load=False)
    predictor = SlidingWindowPredictor(TorchModuleBackend(loaded.network), (32, 32, 32), sw_batch_size=4)
    array, affine = read_nifti(image_path)
    return segment_array(predictor, transforms, loaded.labels, array, affine).mask


@pytest.mark.parametrize("backend", [*BACKENDS, "openvino"])
def test_registered_version_is_served_through_the_backend(
    request: pytest.FixtureRequest,
    base_settings: dict[str, Any],
    registered: Registered,
    hippocampus_path: Path,
    backend: str,
) -> None:
    v1, _ = registered.exported
    set_alias(registered.name, "champion", v1, registered.client)
    with running_service(service_settings(request, base_settings, registered, backend), None) as svc:
        response = segment(svc, hippocampus_path.read_bytes(), request_id=f"registry-{backend}-0001")
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["model_version"], body["registry_uri"]) == (str(v1), f"models:/{registered.name}/{v1}")
        with svc.client() as client:
            mask_bytes = client.get(body["mask_nifti_uri"]).content
        mask = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(mask_bytes)).dataobj)
        expected = reference_mask(f"models:/{registered.name}/{v1}", hippocampus_path)
        assert mask.shape == expected.shape and len(np.unique(expected)) > 1
        # the export through the backend + the model's own transforms give the PyTorch model's labels
        assert (mask == expected).mean() > 0.999

        # the champion moves to a version that was never exported: refused with the reason, v1 keeps serving
        set_alias(registered.name, "champion", registered.unexported, registered.client)
        svc.ctx.models.poll_once()
        assert svc.ctx.models.version("champion") == str(v1)
        reason = svc.ctx.models.load_errors["champion"]
        assert f"version {registered.unexported} has no" in reason and "run voxelflow models export" in reason
        assert ("Triton model" if backend == "triton" else "ONNX export") in reason
        again = segment(svc, hippocampus_path.read_bytes())
        assert again.status_code == 200 and again.json()["model_version"] == str(v1)
        with svc.client(None) as client:
            assert client.get("/readyz").status_code == 200
            metrics = client.get("/metrics").text
    assert f'voxelflow_inference_model_info{{name="{registered.name}",route="champion",version="{v1}"}} 1.0' in metrics
    assert 'voxelflow_inference_model_load_failures_total{alias="champion"}' in metrics
    assert f'voxelflow_inference_windows_total{{model_version="{v1}",route="champion"}}' in metrics


@pytest.mark.parametrize("backend", BACKENDS)
def test_champion_moves_under_load_without_a_failed_request(
    request: pytest.FixtureRequest,
    base_settings: dict[str, Any],
    registered: Registered,
    hippocampus_path: Path,
    backend: str,
) -> None:
    """The alias moves in MLflow while three clients stream requests; the watcher's poll loads and warms
    v2 beside v1 and swaps it in. No request fails, requests that start after the swap get v2, and v1 is
    released (on Triton: unloaded from the server) only after its last request."""
    v1, v2 = registered.exported
    set_alias(registered.name, "champion", v1, registered.client)
    data = hippocampus_path.read_bytes()
    settings = {**service_settings(request, base_settings, registered, backend), "max_concurrent": 2, "max_queue": 16}
    with running_service(settings, None) as svc:
        statuses: Counter[int] = Counter()
        versions: list[tuple[float, str]] = []  # (request start, version that answered)
        stop = threading.Event()
        lock = threading.Lock()

        def client_loop() -> None:
            with svc.client() as client:
                while not stop.is_set():
                    started = time.monotonic()
                    response = client.post("/v1/segmentations", files={"file": ("i.nii.gz", data)})
                    with lock:
                        statuses[response.status_code] += 1
                        if response.status_code == 200:
                            versions.append((started, response.json()["model_version"]))

        with svc.ctx.models.acquire("champion") as old:
            pass
        clients = [threading.Thread(target=client_loop) for _ in range(3)]
        for thread in clients:
            thread.start()
        time.sleep(1.5)
        set_alias(registered.name, "champion", v2, registered.client)
        svc.ctx.models.poll_once()  # what the watcher thread does every alias_poll_seconds
        swapped_at = time.monotonic()
        time.sleep(1.5)
        stop.set()
        for thread in clients:
            thread.join()
        assert svc.ctx.models.version("champion") == str(v2)
        assert not old.predictor.backend.ready  # v1 released after its last request
        if backend == "triton":
            server = request.getfixturevalue("triton_server")
            import tritonclient.grpc as grpcclient

            triton = grpcclient.InferenceServerClient(server.url)
            try:
                assert triton.is_model_ready(registered.name, str(v2))
                assert not triton.is_model_ready(registered.name, str(v1))
            finally:
                triton.close()

    assert set(statuses) == {200}, statuses
    before = [v for t, v in versions if t < swapped_at]
    after = [v for t, v in versions if t > swapped_at]
    assert before and str(v1) in before and set(before) <= {str(v1), str(v2)}
    assert after and set(after) == {str(v2)}


def test_canary_share_of_patients_goes_to_the_candidate(
    request: pytest.FixtureRequest, base_settings: dict[str, Any], registered: Registered, hippocampus_path: Path
) -> None:
    """Champion v1, candidate v2, share 0.5: each patient gets the version sha256(keyed pseudonym) assigns it,
    the split over the patients is near one half, and the metrics are per route and version."""
    v1, v2 = registered.exported
    set_alias(registered.name, "champion", v1, registered.client)
    set_alias(registered.name, "candidate", v2, registered.client)
    settings = {**service_settings(request, base_settings, registered, "onnxruntime"), "canary_share": 0.5}
    patients = [f"CANARY-{n:04d}" for n in range(24)]
    data = hippocampus_path.read_bytes()
    try:
        with running_service(settings, None) as svc:
            answered = {}
            for patient in patients:
                response = segment(svc, data, patient_id=patient)
                assert response.status_code == 200, response.text
                answered[patient] = (response.json()["route"], response.json()["model_version"])
            pinned = segment(svc, data, patient_id=patients[0], model_alias="candidate").json()
            with svc.client(None) as client:
                metrics = client.get("/metrics").text
    finally:
        registered.client.delete_registered_model_alias(registered.name, "candidate")
    key, project = svc.ctx.settings.resolved_deid_key(), svc.ctx.settings.project
    for patient, (route, version) in answered.items():
        reference = pseudonymise_patient_id(key, project, patient)
        expected = ("candidate", str(v2)) if routes_to_candidate(reference, 0.5) else ("champion", str(v1))
        assert (route, version) == expected, patient
    share = sum(route == "candidate" for route, _ in answered.values()) / len(patients)
    assert 0.25 <= share <= 0.75  # 24 patients: binomial sd 0.10
    assert pinned["model_version"] == str(v2)  # an explicit alias wins over the hash
    for route, version in (("candidate", v2), ("champion", v1)):
        assert f'mode="sync",model_version="{version}",outcome="succeeded",route="{route}"' in metrics


def test_export_keeps_the_newest_and_every_aliased_version_in_the_triton_repository(
    mlflow_uri: str, s3_url: str, shared_data: Path
) -> None:
    """A polling Triton serves every version its repository holds, so exports prune what no alias needs."""
    from services.inference.triton_repository import model_versions

    client = registry_client(mlflow_uri)
    name = unique_model_name("retained")
    store = open_object_store(s3_url)
    msd = str(shared_data / "msd_task04_hippocampus")
    versions = [register_tiny_model(client, name, seed=seed) for seed in (4, 5, 6)]
    set_alias(name, "champion", versions[0], client)  # the rollback target must stay loadable

    def export(version: int) -> list[int]:
        uri = f"models:/{name}/{version}"
        return export_registered_model(
            uri, store, cases=msd, case_limit=1, client=client, retain_versions=1
        ).pruned_versions

    assert export(versions[0]) == [] and export(versions[1]) == []
    assert export(versions[2]) == [versions[1]]  # neither the newest nor aliased
    assert model_versions(store, name) == [versions[0], versions[2]]


def test_export_over_the_api_runs_as_a_worker_job(
    request: pytest.FixtureRequest, base_settings: dict[str, Any], registered: Registered, shared_data: Path
) -> None:
    """``POST /v1/model-exports`` (what ``voxelflow models export`` sends): queued, run by a real Celery worker
    consuming the inference queue, followed to its result; the gate's failure is a failed job with its reason."""
    from celery.contrib.testing.worker import start_worker

    import services.inference.tasks  # noqa: F401  (registers the tasks with the app the worker serves)
    from services.inference import worker
    from services.inference.triton_repository import model_versions
    from tests.service_harness import wait_for

    version = register_tiny_model(registered.client, registered.name, seed=7)
    msd = str(shared_data / "msd_task04_hippocampus")
    with running_service(service_settings(request, base_settings, registered, "onnxruntime"), None) as svc:
        worker.use_context(svc.ctx)
        with svc.client("operator") as operator:
            bad = operator.post("/v1/model-exports", json={"model_uri": "hippocampus/3"})
            assert bad.status_code == 422
            bad = operator.post("/v1/model-exports", json={"model_uri": "models:/x/1", "quantize": "fp8"})
            assert bad.status_code == 422
            with svc.client("researcher") as researcher:
                assert researcher.post("/v1/model-exports", json={"model_uri": "models:/x/1"}).status_code == 403
            asked = operator.post(
                "/v1/model-exports",
                json={
                    "model_uri": f"models:/{registered.name}/{version}",
                    "cases": msd,
                    "case_limit": 1,
                    "quantize": "int8",
                    "max_dice_loss": 1.0,  # a random tiny model: the gate's threshold is tested in test_export
                },
            )
            assert asked.status_code == 202, asked.text
            assert asked.headers["Location"] == f"/v1/model-exports/{asked.json()['id']}"
            failing = operator.post(
                "/v1/model-exports", json={"model_uri": f"models:/{registered.name}/999", "cases": msd}
            ).json()
            with start_worker(svc.ctx.celery, queues=["inference"], perform_ping_check=False, shutdown_timeout=30):

                def final(export_id: str) -> dict[str, Any] | None:
                    state: dict[str, Any] = operator.get(f"/v1/model-exports/{export_id}").json()
                    return state if state["status"] in ("succeeded", "failed") else None

                done = wait_for(lambda: final(asked.json()["id"]), timeout=180, what="the export job")
                refused = wait_for(lambda: final(failing["id"]), timeout=60, what="the failing export job")
            assert operator.get("/v1/model-exports/00000000-0000-0000-0000-000000000000").status_code == 404
    assert done["status"] == "succeeded", done
    assert done["result"]["parity"]["passed"] and done["result"]["version"] == version
    int8 = done["result"]["int8"]
    assert int8["requested"] and int8["passed"] and len(int8["per_case_dice"]) == 1 and int8["int8_bytes"] > 0
    assert "model/onnx-int8/model.onnx" in done["result"]["attached"]
    assert version in model_versions(open_object_store(base_settings["storage_url"]), registered.name)
    assert refused["status"] == "failed" and "999" in refused["error"]
