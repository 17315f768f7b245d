"""``make bench-train``: the platform's training recipe beside a plain MONAI script, same split, same run.

Arms, each in its own process (so each reports its own peak memory), on the bundled hippocampus set with
the platform's own patient-level holdout split (``services.preprocessing.splits.holdout_split``):

- ``platform``: ``train_local`` (the loop every site worker and ``voxelflow train`` run) with the
  bundled config (default ``hippocampus_unet``) and the spec's augmentation (``--spec``, default
  ``mr_hippocampus``); the weights kept by validation, post-processing chosen on validation, test-time
  mirroring as stored with the model; ``--compare-spec NAME`` adds a row ``platform[NAME]``: the same arm,
  config and epochs with that spec's augmentation (the deterministic steps of both must be the same);
- ``federated``: FedAvg over 3 IID sites (``services.preprocessing.sites.assign_iid``) at equal compute
  (rounds x local epochs = the platform's epochs, each site on its third of the training cases), with the
  same local loop, the schedule spanning the whole run and the round of the best global validation Dice;
- ``baseline``: ``ci/baselines/plain_monai.py`` for the wall time the platform arm took.

Every arm's test Dice comes from the same scorer (``shared.evaluation.held_out.evaluate_network``, the
served predictor), as the mean over cases of each case's mean foreground Dice. Prints a table, writes
out/bench-train.json and out/bench-train.png (validation Dice against wall time). Timing figures are
meaningful only on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.data import shared_data_dir  # noqa: E402

SITES = 3


def split_cases(root: Path, seed: int = 0) -> dict[str, list[str]]:
    """The holdout split a dataset version of the whole set gets, plus the IID site of each training case."""
    from services.preprocessing.sites import assign_iid, site_names
    from services.preprocessing.splits import SplitCase, holdout_split

    ids = sorted(p.name.removesuffix(".nii.gz") for p in (root / "labelsTr").glob("*.nii.gz"))
    split = holdout_split([SplitCase(i, i, "site-1", "0,1,2") for i in ids], seed=seed)
    site_of = assign_iid(split["train"], SITES, seed)
    names = site_names(SITES)
    return {**split, **{name: sorted(c for c in split["train"] if site_of[c] == name) for name in names}}


def test_dice(network: torch.nn.Module, cases: list[dict[str, Any]], config: Any | None) -> dict[str, Any]:
    from shared.evaluation.held_out import evaluate_network, mean_dice

    labels = {0: "background", 1: "anterior", 2: "posterior"}
    inference = config.inference if config is not None else None
    records = evaluate_network(
        network,
        cases,
        labels,
        config.validation.roi_size if config is not None else (48, 64, 48),
        mirror_axes=inference.mirror_axes if inference else (),
        largest_component_labels=(inference.largest_component_labels or ()) if inference else (),
    )
    per_label = {
        name: sum(r["dice"] for r in records if r["label_name"] == name)
        / max(1, sum(1 for r in records if r["label_name"] == name))
        for name in ("anterior", "posterior")
    }
    return {"test_dice": mean_dice(records), "test_dice_per_label": per_label, "test_cases": len(cases)}


def arm_platform(args: argparse.Namespace, cases: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    from shared.evaluation.held_out import choose_largest_component_labels, network_from_state
    from shared.preprocessing import build_transforms, load_spec
    from shared.training import load_config, train_local

    config = load_config(args.config)
    spec = load_spec(args.spec)
    curve: list[dict[str, float]] = []
    started = time.perf_counter()

    def progress(record: Any) -> None:
        curve.append({"epoch": record.epoch, "seconds": time.perf_counter() - started, "val_dice": record.val_dice})
        print(json.dumps({"arm": "platform", **curve[-1], "loss": round(record.train_loss, 4)}), flush=True)

    result = train_local(
        config,
        cases["train"],
        cases["val"],
        None,
        augment=build_transforms(spec, "augment"),
        epochs=args.epochs,
        progress=progress,
    )
    train_seconds = time.perf_counter() - started
    weights = result.kept_state(config.keep)
    network = network_from_state(config, weights)
    labels = {0: "background", 1: "anterior", 2: "posterior"}
    chosen, evidence = choose_largest_component_labels(
        network, cases["val"], labels, config.validation.roi_size, mirror_axes=config.inference.mirror_axes
    )
    config = config.model_copy(
        update={"inference": config.inference.model_copy(update={"largest_component_labels": chosen})}
    )
    samples = sum(h.samples for h in result.history[1:]) or result.history[0].samples
    seconds = sum(h.seconds for h in result.history[1:]) or result.history[0].seconds
    return {
        "train_seconds": train_seconds,
        "epochs": len(result.history),
        "kept_epoch": result.best_epoch,
        "samples_per_second": samples / seconds,
        "largest_component_labels": chosen,
        "postprocessing_evidence": evidence,
        "mirror_axes": list(config.inference.mirror_axes),
        "curve": curve,
        **test_dice(network, cases["test"], config),
    }


def arm_baseline(args: argparse.Namespace, cases: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    from ci.baselines.plain_monai import train_plain
    from shared.evaluation.held_out import evaluate_network, mean_dice

    labels = {0: "background", 1: "anterior", 2: "posterior"}
    curve: list[dict[str, float]] = []

    def validate(network: torch.nn.Module) -> float:
        return float(mean_dice(evaluate_network(network, cases["val"], labels, (48, 64, 48))) or 0.0)

    def on_epoch(epoch: int, seconds: float, dice: float) -> None:
        curve.append({"epoch": epoch, "seconds": seconds, "val_dice": dice})
        print(json.dumps({"arm": "baseline", **curve[-1]}), flush=True)

    started = time.perf_counter()
    network = train_plain(cases["train"], args.seconds, validate, on_epoch)
    return {
        "train_seconds": time.perf_counter() - started,
        "epochs": len(curve),
        "curve": curve,
        **test_dice(network, cases["test"], None),
    }


ARMS = {"platform": arm_platform, "baseline": arm_baseline}


def run_arm(args: argparse.Namespace) -> None:
    """One arm in this process; its JSON (with this process's peak RSS) goes to ``--arm-out``."""
    from shared.training.msd import load_msd_cases

    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.data)
    split = split_cases(root)
    wanted = ["train", "val", "test", *[s for s in split if s.startswith("site-")]]
    loaded = {c["case_id"]: c for c in load_msd_cases(root, sorted(set(split["train"] + split["val"] + split["test"])))}
    cases = {part: [loaded[i] for i in split[part]] for part in wanted}
    report = ARMS[args.arm](args, cases)
    report["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    Path(args.arm_out).write_text(json.dumps(report, indent=1))


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2))
    for arm, result in report["arms"].items():
        points = [p for p in result["curve"] if p.get("val_dice") is not None]
        axis.plot([p["seconds"] / 60 for p in points], [p["val_dice"] for p in points], marker=".", label=arm)
    axis.axhline(0.85, color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel("wall time (min, training + per-epoch validation)")
    axis.set_ylabel("validation Dice (mean of labels)")
    axis.set_title(f"hippocampus, {report['torch_threads']} CPU threads")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="hippocampus_unet", help="the platform arm's training config")
    parser.add_argument("--epochs", type=int, default=None, help="platform epochs (default: the config's)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--spec", default="mr_hippocampus", help="the platform arm's spec (its augmentation)")
    parser.add_argument(
        "--compare-spec", default=None, help="also run the platform arm with this spec's augmentation (own row)"
    )
    parser.add_argument("--target-dice", type=float, default=0.85)
    parser.add_argument("--out", type=Path, default=REPO / "out" / "bench-train.json")
    parser.add_argument("--arm", choices=sorted(ARMS), help=argparse.SUPPRESS)
    parser.add_argument("--arm-out", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        run_arm(args)
        return
    data = shared_data_dir()
    if data is None:
        sys.exit("shared data not found: set VOXELFLOW_SHARED_DATA")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    common = [sys.executable, __file__, "--data", str(data / "msd_task04_hippocampus"), "--config", args.config]
    if args.threads:
        common += ["--threads", str(args.threads)]
    arms: dict[str, Any] = {}
    runs = [("platform", "platform", args.spec)]
    if args.compare_spec:
        from shared.preprocessing import load_spec

        if load_spec(args.compare_spec).hash != load_spec(args.spec).hash:
            sys.exit(f"--compare-spec {args.compare_spec}: its deterministic steps differ from {args.spec}'s")
        runs.append((f"platform[{args.compare_spec}]", "platform", args.compare_spec))
    runs.append(("baseline", "baseline", args.spec))
    for name, arm, spec in runs:
        extra = ["--epochs", str(args.epochs)] if arm == "platform" and args.epochs else []
        if arm == "baseline":  # the same wall time the platform took: equal compute on the same machine
            extra = ["--seconds", str(arms["platform"]["train_seconds"])]
        out = args.out.with_name(f"bench-train-{name.replace('[', '-').rstrip(']')}.json")
        command = [*common, "--spec", spec, "--arm", arm, "--arm-out", str(out), *extra]
        subprocess.run(command, check=True, cwd=REPO)
        arms[name] = json.loads(out.read_text())
        reached = [p["seconds"] for p in arms[name]["curve"] if (p.get("val_dice") or 0) >= args.target_dice]
        arms[name]["seconds_to_target_val_dice"] = reached[0] if reached else None
    report = {
        "host": platform.node(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": args.threads or torch.get_num_threads(),
        "config": args.config,
        "spec": args.spec,
        "target_val_dice": args.target_dice,
        "arms": arms,
    }
    args.out.write_text(json.dumps(report, indent=2))
    plot(report, args.out.with_suffix(".png"))
    print(
        f"\n{'arm':32} {'test Dice':>9} {'anterior':>9} {'posterior':>9} {'train s':>8} {'epochs':>6} "
        f"{'s to val ' + str(args.target_dice):>12} {'peak GiB':>8}"
    )
    for arm, r in arms.items():
        to_target = r["seconds_to_target_val_dice"]
        print(
            f"{arm:32} {r['test_dice']:9.4f} {r['test_dice_per_label']['anterior']:9.4f} "
            f"{r['test_dice_per_label']['posterior']:9.4f} {r['train_seconds']:8.0f} {r['epochs']:6d} "
            f"{'-' if to_target is None else f'{to_target:.0f}':>12} {r['peak_rss_gib']:8.2f}"
        )
    gain = arms["platform"]["test_dice"] - arms["baseline"]["test_dice"]
    print(f"platform - baseline test Dice: {gain:+.4f}; wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
