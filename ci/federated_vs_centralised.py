"""FedAvg across the stack's site workers vs the centralised baseline, same data, same epochs of compute.

``make compare-training DATASET=ds-…`` (after ``make demo``, which builds the 3-site hippocampus version):
a federated run of R rounds x E local epochs through the aggregation service (each site trains R·E epochs on
its third of the data), and ``voxelflow train`` for R·E epochs on all sites' training cases (the same
``train_local`` code path). Both are scored on the version's ``holdout.test`` by the same function and
registered in MLflow. Prints the table; JSON in out/federated-vs-centralised.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.auth import Role, create_token  # noqa: E402
from shared.db.base import make_engine, make_session_factory, session_scope  # noqa: E402
from shared.stack import Stack, StackConfig  # noqa: E402


def federated(stack: Stack, env: dict[str, str], args: argparse.Namespace) -> dict[str, object]:
    session_factory = make_session_factory(make_engine(env["VOXELFLOW_DATABASE_URL"]))
    with session_scope(session_factory) as session:
        token = create_token(session, f"compare-{int(time.time())}", Role.OPERATOR)
    base = stack.components["aggregation-api"].url
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        body = {
            "dataset_version": args.dataset,
            "sites": list(stack.config.training_sites),
            "rounds": args.rounds,
            "local_epochs": args.local_epochs,
            "strategy": "fedavg",
            "round_timeout_seconds": 7200,
        }
        response = client.post("/federated-runs", json=body)
        response.raise_for_status()
        run_id = response.json()["id"]
        started, seen = time.monotonic(), -1
        while True:
            state = client.get(f"/federated-runs/{run_id}").json()
            done = [r for r in state["round_progress"] if r["status"] == "aggregated"]
            if len(done) - 1 > seen:
                seen = len(done) - 1
                dice = done[-1]["metrics"].get("val_dice_mean") if done else None
                print(f"  FedAvg round {len(done)}/{args.rounds}: global val Dice {dice}", flush=True)
            if state["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(5)
    if state["status"] != "succeeded":
        sys.exit(f"federated run {run_id}: {state['status']} {state.get('error')}")
    import mlflow

    metrics = mlflow.MlflowClient(env["VOXELFLOW_MLFLOW_TRACKING_URI"]).get_run(state["mlflow_run_id"]).data.metrics
    return {
        "seconds": time.monotonic() - started,
        "run": run_id,
        "test": {k: v for k, v in metrics.items() if k.startswith("test/")},
    }


def centralised(env: dict[str, str], args: argparse.Namespace) -> dict[str, object]:
    out = REPO / "out" / f"centralised-{args.dataset}-{args.rounds * args.local_epochs}ep"
    command = [sys.executable, "-m", "shared.cli", "train", "--dataset", args.dataset, "--out", str(out)]
    command += [
        "--epochs",
        str(args.rounds * args.local_epochs),
        "--register",
        "--model-name",
        "hippocampus-centralised",
    ]
    started = time.monotonic()
    subprocess.run(command, cwd=REPO, env={**os.environ, **env}, check=True)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"seconds": time.monotonic() - started, "out": str(out), "test": metrics["test"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="dataset version id (ds-…), e.g. the one make demo built")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=2)
    args = parser.parse_args()
    stack = Stack(StackConfig.from_env(), log=lambda m: print(m, flush=True))
    env = stack.up(with_services=True)
    print(f"FedAvg: {args.rounds} rounds x {args.local_epochs} local epochs over {stack.config.training_sites}")
    fed = federated(stack, env, args)
    print(f"centralised: {args.rounds * args.local_epochs} epochs on all training cases")
    central = centralised(env, args)
    rows = sorted({k for k in fed["test"] if k.endswith("dice") or k.endswith("dice_mean")})  # type: ignore[union-attr]
    print(f"\n{'test-split metric':<28} {'FedAvg':>9} {'centralised':>12}")
    for key in rows:
        a, b = fed["test"].get(key), central["test"].get(key)  # type: ignore[union-attr]
        print(f"{key:<28} {a:>9.4f} {b:>12.4f}" if a is not None and b is not None else f"{key:<28} {a} {b}")
    print(f"{'wall time (s)':<28} {fed['seconds']:>9.0f} {central['seconds']:>12.0f}")
    Path(REPO / "out").mkdir(exist_ok=True)
    (REPO / "out" / "federated-vs-centralised.json").write_text(
        json.dumps({"fedavg": fed, "centralised": central}, indent=2)
    )


if __name__ == "__main__":
    main()
