"""The contracts between services (shared.contracts) and the import-time behaviour of the service modules."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.contracts import codec, layout, messages, tasks
from shared.proto.voxelflow.v1 import training_pb2

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("ingest", "preprocessing", "training_worker", "aggregation", "inference")


def test_update_keys_parse_back_and_foreign_keys_do_not() -> None:
    key = layout.update_key("run-1", 3, "site-a", layout.attempt_id("run-1", 3, "site-a"))
    assert layout.parse_update_key("run-1", key) == (3, "site-a", "run-1-r3-site-a")
    assert layout.parse_update_key("run-2", key) is None
    assert layout.parse_update_key("run-1", layout.weights_key("run-1", 3, "site-a", "x")) is None
    assert layout.global_key("run-1", 3).startswith(layout.round_prefix("run-1", 3))


def test_training_queue_is_the_same_function_on_both_sides() -> None:
    from services.aggregation.context import AggregationContext
    from services.aggregation.settings import AggregationSettings
    from services.training_worker.context import TrainingWorkerContext
    from services.training_worker.settings import TrainingWorkerSettings

    worker = TrainingWorkerContext(TrainingWorkerSettings(site="site-b", training_queue_prefix="fl."))
    aggregator = AggregationContext(AggregationSettings(training_queue_prefix="fl."))
    assert worker.queue == aggregator.training_queue("site-b") == "fl.site-b"
    assert tasks.training_queue("site-b") == "training.site-b"


def test_every_task_has_a_soft_limit_below_its_hard_limit() -> None:
    names = [t.name for t in tasks.ALL_TASKS]
    assert len(names) == len(set(names))
    for contract in tasks.ALL_TASKS:
        assert 0 < contract.soft_time_limit < contract.time_limit, contract.name
    # a round must be killed before the broker hands it to a second worker (visibility timeout 6 h)
    assert tasks.TRAIN_ROUND.time_limit < 6 * 3600


def test_messages_round_trip_with_every_field_and_refuse_what_is_not_the_message() -> None:
    update = training_pb2.ModelUpdate(run_id="r", round=2, site="site-a", num_samples=7)
    data = messages.to_dict(update)
    assert data["clip_norm"] == 0.0 and data["task_attempt_id"] == ""  # defaults are written, not left out
    assert messages.from_dict(data, training_pb2.ModelUpdate) == update
    assert messages.from_json_bytes(messages.to_json_bytes(update), training_pb2.ModelUpdate) == update
    for bad in ([1], {"runId": "camelCase is not the contract", "no_such_field": 1}, {"round": "two"}):
        with pytest.raises(messages.MessageError):
            messages.from_dict(bad, training_pb2.ModelUpdate)
    with pytest.raises(messages.MessageError):
        messages.from_json_bytes(b"\xff not json", training_pb2.ModelUpdate)


def test_codec_round_trips_tensors_and_refuses_other_pickles() -> None:
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "step": torch.tensor(3)}
    back = codec.state_from_bytes(codec.state_to_bytes(state))
    assert set(back) == {"w", "step"} and torch.equal(back["w"], state["w"])
    with pytest.raises(ValueError):
        codec.state_from_bytes(b"not a pickle")
    import io
    import pickle

    buffer = io.BytesIO()
    pickle.dump(object(), buffer)  # anything but tensors and containers is refused by weights_only
    with pytest.raises(ValueError):
        codec.state_from_bytes(buffer.getvalue())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("service", SERVICES)
def test_importing_a_worker_module_does_nothing_until_celery_asks_for_the_app(service: str, tmp_path: Path) -> None:
    """No settings read, no metrics server, no database, no tasks registered at import; ``app`` then builds it."""
    port = _free_port()
    script = f"""
import json, socket, sys
import services.{service}.worker as w
before = [m for m in sys.modules if m.startswith("services.{service}.tasks")]
with socket.socket() as s:
    bound = s.connect_ex(("127.0.0.1", {port})) == 0
from celery.app.utils import find_app
app = find_app("services.{service}.worker")
names = sorted(n for n in app.tasks if not n.startswith("celery."))
print(json.dumps({{"before": before, "bound": bound, "same": app is w.celery_app, "tasks": names,
                  "limits": [[app.tasks[n].soft_time_limit, app.tasks[n].time_limit] for n in names]}}))
"""
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO),
        "VOXELFLOW_METRICS_PORT": str(port),
        # a database that does not exist: an import that connected or migrated would fail
        "VOXELFLOW_DATABASE_URL": f"sqlite:///{tmp_path}/missing/dir/db.sqlite",
        "VOXELFLOW_STORAGE_URL": f"file://{tmp_path}/objects",
        "VOXELFLOW_LOG_JSON": "false",
    }
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["before"] == [] and result["bound"] is False and result["same"] is True
    ours = [
        n
        for n in result["tasks"]
        if n.split(".")[0] in {"ingest", "preprocessing", "training", "aggregation", "inference"}
    ]
    assert ours, result["tasks"]
    contracts = {t.name: [t.soft_time_limit, t.time_limit] for t in tasks.ALL_TASKS}
    for name, limits in zip(result["tasks"], result["limits"], strict=True):
        if name in contracts:
            assert limits == contracts[name], name


def test_series_volume_keys_sit_side_by_side() -> None:
    """A diffusion volume's FSL sidecars live beside its NIfTI, under one series generation."""
    nifti = layout.volume_key("1.2.3", 4, "volume")
    assert nifti == "volumes/1.2.3/g4/volume.nii.gz"
    assert layout.volume_bval_key("1.2.3", 4, "volume") == nifti.removesuffix(".nii.gz") + ".bval"
    assert layout.volume_bvec_key("1.2.3", 4, "volume") == nifti.removesuffix(".nii.gz") + ".bvec"
    assert layout.FRAME_AXES == ("time", "diffusion")
