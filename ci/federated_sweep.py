"""Federated semantics measured in one process: server-optimiser tuning and IID vs non-IID site splits.

Why in one process: the grid of Reddi et al. (2021) is many short runs; through the services each would pay
queue, storage and process start-up. The pieces are the services' own: ``train_local`` with the run-wide
schedule and the carried optimiser state (what a site worker does per round), the aggregation maths of
``services.aggregation.strategies`` (FedAvg / FedAdam / FedYogi, FedBN's local keys), the site assignment of
``services.preprocessing.sites`` (iid, intensity and size quantile blocks over the raw images' mean intensity
and physical volume, as a dataset build does) and the scoring of ``shared.evaluation.held_out`` (what the
aggregator logs). Real hippocampus cases (MSD Task04). One torch thread.

    .venv/bin/python ci/federated_sweep.py grid   [--rounds 6 --lrs 0.003,0.01,0.03,0.1 --taus 1e-3,1e-2]
    .venv/bin/python ci/federated_sweep.py splits [--rounds 6 --strategy fedavg]

Writes out/federated-sweep-{grid,splits}.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.aggregation.strategies import (  # noqa: E402
    ServerOptimizerConfig,
    ServerOptimizerState,
    Strategy,
    aggregate,
)
from services.preprocessing.sites import assign_by_quantile, assign_iid  # noqa: E402
from shared.data import shared_data_dir  # noqa: E402
from shared.evaluation import mean_dice_per_case  # noqa: E402
from shared.evaluation.held_out import evaluate_network, network_from_state  # noqa: E402
from shared.training import TrainingConfig, build_network, train_local  # noqa: E402
from shared.training.federated import config_norm_keys  # noqa: E402
from shared.training.msd import load_msd_cases  # noqa: E402

LABELS = {0: "bg", 1: "anterior", 2: "posterior"}
SITES = ["site-1", "site-2", "site-3"]


def tiny_config(norm: str, seed: int) -> TrainingConfig:
    return TrainingConfig.model_validate(
        {
            "network": {
                "name": "unet",
                "args": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1, "norm": norm},
            },
            "optimizer": {"name": "adamw", "lr": 0.002},
            "schedule": {"name": "poly", "warmup_epochs": 1},
            "patch": {"sampler": "pos_neg", "size": [32, 32, 32], "num_samples": 2},
            "batch_size": 4,
            "validation": {"roi_size": [48, 64, 48]},
            "early_stopping": {"patience": None},
            "seed": seed,
        }
    )


def raw_values(root: Path, case_ids: list[str]) -> dict[str, dict[str, float]]:
    """Per case what a dataset build's non-IID assignment sorts by (services/preprocessing/case_files.py)."""
    import nibabel as nib

    values = {}
    for case_id in case_ids:
        image = nib.load(str(root / "imagesTr" / f"{case_id}.nii.gz"))
        data = np.asarray(image.dataobj)
        zooms = [float(z) for z in image.header.get_zooms()[:3]]
        values[case_id] = {
            "intensity": float(data.mean(dtype=np.float64)),
            "size": float(np.prod(data.shape[:3]) * np.prod(zooms)),
        }
    return values


def split(case_ids: list[str], values: dict[str, dict[str, float]], strategy: str, test: list[str], seed: int) -> dict:
    """site → {train, val, test}: every case assigned by ``strategy``; the test cases are the same for every
    strategy (so the pooled test Dice is comparable) and belong to the site the strategy gives them."""
    if strategy == "iid":
        site_of = assign_iid(case_ids, len(SITES), seed)
    else:
        site_of = assign_by_quantile({c: values[c][strategy] for c in case_ids}, len(SITES), seed, 1.0)
    parts: dict[str, dict[str, list[str]]] = {s: {"train": [], "val": [], "test": []} for s in SITES}
    for case_id in sorted(case_ids):
        if case_id in test:
            parts[site_of[case_id]]["test"].append(case_id)
    for site in SITES:
        rest = sorted(c for c in case_ids if site_of[c] == site and c not in test)
        random.Random(seed).shuffle(rest)
        parts[site]["val"], parts[site]["train"] = rest[:2], rest[2:]
    return parts


def to_numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}


def to_torch(state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


def score(config: TrainingConfig, state: dict[str, np.ndarray], cases: list[dict]) -> dict[str, float]:
    records = evaluate_network(network_from_state(config, state), cases, LABELS, config.validation.roi_size)
    return mean_dice_per_case(records)


def federated(
    config: TrainingConfig,
    data: dict[str, dict[str, list[dict]]],
    *,
    rounds: int,
    local_epochs: int,
    strategy: Strategy,
    server: ServerOptimizerConfig,
    keep_optimizer_state: bool = True,
    local_norm_layers: bool = False,
) -> dict[str, Any]:
    """One run as the services run it: per round every site trains from the global model, the aggregator
    averages, steps and scores the global model on the pooled val cases; the best round is the result."""
    torch.manual_seed(config.seed)
    global_state = to_numpy(build_network(config, 1, 3).state_dict())
    local_keys = config_norm_keys(config) if local_norm_layers else frozenset()
    optimizer_states: dict[str, Any] = {}
    norms: dict[str, dict[str, torch.Tensor]] = {}
    server_state: ServerOptimizerState | None = None
    val_cases = [c for site in SITES for c in data[site]["val"]]
    history, states, started = [], [], time.perf_counter()
    for r in range(rounds):
        updates, counts = [], []
        for site in SITES:
            start = {**to_torch(global_state), **norms.get(site, {})}
            result = train_local(
                config, data[site]["train"], [], start, epochs=local_epochs,
                schedule_offset=r * local_epochs, schedule_total=rounds * local_epochs,
                optimizer_state=optimizer_states.get(site) if keep_optimizer_state else None,
            )  # fmt: skip
            optimizer_states[site] = result.optimizer_state
            if local_keys:
                norms[site] = {k: result.state_dict[k] for k in local_keys}
            updates.append(to_numpy(result.state_dict))
            counts.append(result.num_samples)
        global_state, server_state = aggregate(
            strategy, global_state, updates, counts, server_state, server, local_keys=local_keys
        )
        val = score(config, global_state, val_cases)
        history.append(
            {"round": r, "val_dice": float(np.mean(list(val.values()))), "seconds": time.perf_counter() - started}
        )
        states.append(global_state)
        print(
            f"    round {r}: global val Dice {history[-1]['val_dice']:.4f} ({history[-1]['seconds']:.0f} s)", flush=True
        )
    best = max(range(rounds), key=lambda i: (history[i]["val_dice"], -i))
    return {"history": history, "best_round": best, "best_state": states[best]}


def test_dice(config: TrainingConfig, state: dict[str, np.ndarray], data: dict) -> dict[str, Any]:
    per_site = {site: score(config, state, data[site]["test"]) for site in SITES}
    pooled = {case: dice for site in SITES for case, dice in per_site[site].items()}
    return {
        "pooled": float(np.mean(list(pooled.values()))),
        "sites": {s: (float(np.mean(list(d.values()))) if d else None) for s, d in per_site.items()},
        "cases": {s: len(d) for s, d in per_site.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["grid", "splits"])
    parser.add_argument("--cases", type=int, default=45, help="hippocampus cases drawn (seeded) from the 260")
    parser.add_argument("--test-cases", type=int, default=9)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lrs", default="0.003,0.01,0.03,0.1")
    parser.add_argument("--taus", default="1e-3,1e-2")
    parser.add_argument("--strategies", default="fedavg", help="splits mode: comma list (fedavg, fedadam, fedbn)")
    parser.add_argument("--out", type=Path, default=REPO / "out")
    args = parser.parse_args()
    torch.set_num_threads(1)

    root = shared_data_dir() / "msd_task04_hippocampus"
    all_ids = sorted(p.name.removesuffix(".nii.gz") for p in (root / "imagesTr").glob("hippocampus_*.nii.gz"))
    rng = random.Random(args.seed)
    case_ids = sorted(rng.sample(all_ids, args.cases))
    test = sorted(rng.sample(case_ids, args.test_cases))
    cases = {c["case_id"]: c for c in load_msd_cases(root, case_ids)}
    values = raw_values(root, case_ids)

    def materialise(parts: dict) -> dict:
        return {s: {p: [cases[c] for c in ids] for p, ids in by_part.items()} for s, by_part in parts.items()}

    args.out.mkdir(exist_ok=True)
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    if args.mode == "grid":
        data = materialise(split(case_ids, values, "iid", test, args.seed))
        config = tiny_config("instance", args.seed)
        runs = [("fedavg", ServerOptimizerConfig())]
        for name in ("fedadam", "fedyogi"):
            for lr in (float(x) for x in args.lrs.split(",")):
                for tau in (float(x) for x in args.taus.split(",")):
                    runs.append((name, ServerOptimizerConfig(lr=lr, tau=tau)))
        for name, server in runs:
            print(f"{name} lr={server.lr} tau={server.tau}", flush=True)
            run = federated(config, data, rounds=args.rounds, local_epochs=args.local_epochs,
                            strategy=Strategy(name), server=server)  # fmt: skip
            results["runs"].append(
                {"strategy": name, "lr": server.lr, "tau": server.tau, "history": run["history"],
                 "best_round": run["best_round"], "best_val_dice": run["history"][run["best_round"]]["val_dice"]}
            )  # fmt: skip
        print("\nstrategy   server lr   tau     best val Dice (round)   last val Dice")
        for row in results["runs"]:
            best, last = f"{row['best_val_dice']:.4f} ({row['best_round']})", row["history"][-1]["val_dice"]
            print(f"{row['strategy']:<10} {row['lr']:<11g} {row['tau']:<7g} {best:<23} {last:.4f}")
    else:
        for strategy in ("iid", "intensity", "size"):
            parts = split(case_ids, values, strategy, test, args.seed)
            data = materialise(parts)
            for name in args.strategies.split(","):
                fedbn = name == "fedbn"
                config = tiny_config("batch" if fedbn else "instance", args.seed)
                print(f"split {strategy}, {name}: train cases per site {[len(parts[s]['train']) for s in SITES]}")
                run = federated(config, data, rounds=args.rounds, local_epochs=args.local_epochs,
                                strategy=Strategy.FEDAVG if name in ("fedavg", "fedbn") else Strategy(name),
                                server=ServerOptimizerConfig(), local_norm_layers=fedbn)  # fmt: skip
                result = test_dice(config, run["best_state"], data)
                results["runs"].append({"split": strategy, "strategy": name, "best_round": run["best_round"],
                                        "history": run["history"], "test": result})  # fmt: skip
        print("\nsplit       strategy  pooled test Dice   " + "   ".join(f"{s} (cases)" for s in SITES))
        for row in results["runs"]:
            sites = "   ".join(
                f"{row['test']['sites'][s]:.4f} ({row['test']['cases'][s]})" if row["test"]["sites"][s] is not None
                else f"  -    ({row['test']['cases'][s]})" for s in SITES
            )  # fmt: skip
            print(f"{row['split']:<11} {row['strategy']:<9} {row['test']['pooled']:.4f}             {sites}")
    path = args.out / f"federated-sweep-{args.mode}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
