"""``make bench-train``: training throughput, time to a validation Dice, and federated round overhead.

Runs train_local (the code every site and the centralised baseline run) on real hippocampus cases, on the
GPU when one is present, else the CPU. Reports:
- samples/s: training patches per second (mean over epochs after the first, which includes warm-up);
- time to val Dice >= target: wall time from the start of training to the first validation reaching it;
- round overhead share: (serialise + upload + download of 3 site updates + FedAvg + upload of the new
  global weights, through a real object store) / (that + one local epoch on a site's share of the data).
Writes out/bench-train.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.data import shared_data_dir  # noqa: E402
from shared.storage import open_object_store  # noqa: E402
from shared.training import load_config, train_local  # noqa: E402
from shared.training.msd import load_msd_cases  # noqa: E402
from shared.training.state import state_from_bytes, state_to_bytes, weighted_average  # noqa: E402


def round_overhead(state: dict, store_url: str, sites: int = 3) -> dict[str, float]:
    store = open_object_store(store_url)
    started = time.perf_counter()
    for site in range(sites):  # each site uploads its update
        store.put_bytes(f"bench/round/site-{site}/weights.pt", state_to_bytes(state))
    uploaded = time.perf_counter()
    updates = [state_from_bytes(store.get_bytes(f"bench/round/site-{s}/weights.pt")) for s in range(sites)]
    downloaded = time.perf_counter()
    merged = weighted_average(updates, [1.0 + s for s in range(sites)])
    averaged = time.perf_counter()
    store.put_bytes("bench/round/global.pt", state_to_bytes(merged))
    state_from_bytes(store.get_bytes("bench/round/global.pt"))  # every site fetches the new global weights
    finished = time.perf_counter()
    return {
        "upload_s": uploaded - started,
        "download_s": downloaded - uploaded,
        "fedavg_s": averaged - downloaded,
        "global_roundtrip_s": finished - averaged,
        "total_s": finished - started,
        "weights_bytes": float(len(state_to_bytes(state))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="hippocampus_unet")
    parser.add_argument("--train-cases", type=int, default=24)
    parser.add_argument("--val-cases", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--target-dice", type=float, default=0.5)
    parser.add_argument("--storage-url", default=None, help="object store for the round overhead (default: temp dir)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "out" / "bench-train.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = shared_data_dir()
    if data is None:
        sys.exit("shared data not found: set VOXELFLOW_SHARED_DATA")
    root = data / "msd_task04_hippocampus"
    ids = sorted(p.name.removesuffix(".nii.gz") for p in (root / "labelsTr").glob("*.nii.gz"))
    ids = ids[: args.train_cases + args.val_cases]
    cases = load_msd_cases(root, ids)
    train, val = cases[: args.train_cases], cases[args.train_cases :]
    config = load_config(args.config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    started = time.perf_counter()
    reached: dict[str, float | None] = {"seconds": None, "epoch": None}

    def progress(record) -> None:  # type: ignore[no-untyped-def]
        if reached["seconds"] is None and record.val_dice is not None and record.val_dice >= args.target_dice:
            reached["seconds"] = time.perf_counter() - started
            reached["epoch"] = record.epoch
        print(
            json.dumps(
                {
                    "epoch": record.epoch,
                    "loss": round(record.train_loss, 4),
                    "val_dice": record.val_dice,
                    "samples_per_s": round(record.samples_per_second, 2),
                }
            ),
            flush=True,
        )

    result = train_local(config, train, val, None, epochs=args.epochs, progress=progress, device=device)
    steady = result.history[1:] or result.history
    samples_per_s = sum(h.samples for h in steady) / sum(h.seconds for h in steady)
    # one site's local epoch: a third of the training cases
    site_epoch_s = sum(h.seconds for h in steady) / len(steady) / 3
    with tempfile.TemporaryDirectory() as tmp:
        overhead = round_overhead(result.state_dict, args.storage_url or Path(tmp).as_uri())
    report = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "host": platform.node(),
        "torch_threads": torch.get_num_threads(),
        "config": args.config,
        "train_cases": len(train),
        "val_cases": len(val),
        "epochs": len(result.history),
        "samples_per_second": samples_per_s,
        "best_val_dice": result.metrics.get("best_val_dice"),
        "target_dice": args.target_dice,
        "seconds_to_target_dice": reached["seconds"],
        "epoch_reaching_target": reached["epoch"],
        "round_overhead": overhead,
        "site_local_epoch_s": site_epoch_s,
        "round_overhead_share": overhead["total_s"] / (overhead["total_s"] + site_epoch_s),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
