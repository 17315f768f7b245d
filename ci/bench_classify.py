"""``make bench-classify``: the platform's classification recipe beside a plain MONAI DenseNet121 script,
on the same split, for the same wall time, in the same run.

Data: the bundled MedMNIST AdrenalMNIST3D (64^3, train 1188 / val 98; the official test part is not
bundled). A test set is carved out of train, deterministically: ``--test-fraction`` of each label's cases by
a seeded permutation (``shared.datasets.medmnist.stratified_split``). The npz carries no patient IDs, so the
split is by case, not by patient (both glands of one patient may straddle it; docs/classification.md).
Val chooses the kept epoch and the operating threshold; test only scores. Both arms read the volumes
resized to the recipe's ``classification.input_size`` (32^3: DenseNet121's four poolings need 32).

Arms, one after the other in this process:

- ``platform``: ``train_local`` with ``--config`` (default ``adrenal_resnet18``), the weights of the best
  validation AUC and the Youden threshold chosen on val with them;
- ``baseline``: ``ci/baselines/plain_monai_classify.py`` (DenseNet121, BCE, Adam 1e-4, flips, last weights)
  for the wall time the platform arm took, its threshold chosen on val the same way.

Printed side by side: test AUC with DeLong's 95 % interval, sensitivity/specificity (Wilson 95 %) at the
validation threshold, ECE (10 bins), and the paired DeLong test of platform vs baseline on the same test
cases; MedMNIST v2's published AdrenalMNIST3D figures are a reference line only (official test split, 28^3,
GPU-length training: not the same test set). Writes out/bench-classify.json. Timing is meaningful only on
an otherwise idle machine. The default (all cases, 2 epochs) is meant for a few minutes on 2 idle CPU
cores; that is an estimate from the reduced run in docs/classification.md, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.data import shared_data_dir  # noqa: E402

PUBLISHED = (
    "MedMNIST v2 (Yang et al. 2023), AdrenalMNIST3D official test split, 28^3: ResNet-18/50 (3-D or ACS) AUC ~0.83-0.84"
)


def load_split(npz: Path, input_size: Any, fraction: float, seed: int, limit: int | None) -> dict[str, list[Any]]:
    from shared.datasets.medmnist import load_medmnist3d, stratified_split

    parts = load_medmnist3d(npz, input_size=input_size, limit=limit)
    train, test = stratified_split(parts["train"], fraction, seed=seed)
    return {"train": train, "val": parts["val"], "test": test}


def scored(network: torch.nn.Module, config: Any, cases: dict[str, list[Any]], threshold: float | None) -> dict:
    from shared.evaluation.classification import choose_threshold, classification_report
    from shared.training.classification import predict_probabilities

    val_probs, val_labels = predict_probabilities(network, cases["val"], config)
    if threshold is None:
        threshold = choose_threshold(val_labels, val_probs, "youden")
    probs, labels = predict_probabilities(network, cases["test"], config)
    report = classification_report(labels, probs, threshold)
    from shared.evaluation.classification import roc_auc

    report["val_auc"] = roc_auc(val_labels, val_probs)
    report["test_probabilities"] = probs.tolist()
    report["test_labels"] = labels.tolist()
    return report


def arm_platform(args: argparse.Namespace, config: Any, cases: dict[str, list[Any]]) -> dict[str, Any]:
    from shared.training import train_local
    from shared.training.networks import build_network

    curve: list[dict[str, Any]] = []
    started = time.perf_counter()

    def progress(record: Any) -> None:
        curve.append({"epoch": record.epoch, "seconds": time.perf_counter() - started, "val_auc": record.val_auc})
        print(json.dumps({"arm": "platform", **curve[-1], "loss": round(record.train_loss, 4)}), flush=True)

    result = train_local(config, cases["train"], cases["val"], None, epochs=args.epochs, progress=progress)
    seconds = time.perf_counter() - started
    network = build_network(config, config.in_channels, config.num_classes)
    network.load_state_dict(result.kept_state(config.keep))
    report = scored(network, config, cases, result.metrics.get("threshold"))
    samples = sum(h.samples for h in result.history)
    return {
        "train_seconds": seconds,
        "epochs": len(result.history),
        "kept_epoch": result.best_epoch,
        "samples_seen": samples,
        "curve": curve,
        **report,
    }


def arm_baseline(args: argparse.Namespace, config: Any, cases: dict[str, list[Any]], seconds: float) -> dict:
    from ci.baselines.plain_monai_classify import train_plain_classifier

    started = time.perf_counter()
    network, seen = train_plain_classifier(cases["train"], seconds, seed=args.seed)
    train_seconds = time.perf_counter() - started
    # the plain script's network is scored through the same BCE probability path as the platform's
    plain = config.model_copy(update={"loss": config.loss.model_copy(update={"name": "bce"})})
    print(json.dumps({"arm": "baseline", "seconds": train_seconds, **seen}), flush=True)
    return {
        "train_seconds": train_seconds,
        "samples_seen": seen["samples"],
        "epochs": seen["epochs_completed"],
        **scored(network, plain, cases, None),
    }


def main() -> None:
    from shared.evaluation.classification import delong_paired_test
    from shared.training import load_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="adrenal_resnet18", help="the platform arm's training config")
    parser.add_argument("--epochs", type=int, default=2, help="platform epochs (default 2: a few CPU minutes)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0, help="the train/test split's seed")
    parser.add_argument("--limit", type=int, default=None, help="first N cases of each part (smoke runs)")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "bench-classify.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = shared_data_dir()
    if data is None:
        sys.exit("shared data not found: set VOXELFLOW_SHARED_DATA")
    config = load_config(args.config)
    if config.task != "classification":
        sys.exit(f"config {args.config} is a {config.task} config, not classification")
    npz = data / "adrenalmnist3d_64" / "adrenalmnist3d_64_trainval.npz"
    cases = load_split(npz, config.classification.input_size, args.test_fraction, args.seed, args.limit)
    counts = {p: (len(c), sum(int(x["label"]) for x in c)) for p, c in cases.items()}
    print(json.dumps({"cases (n, positive)": counts, "input_size": config.classification.input_size}), flush=True)
    arms = {"platform": arm_platform(args, config, cases)}
    arms["baseline"] = arm_baseline(args, config, cases, arms["platform"]["train_seconds"])
    labels = np.asarray(arms["platform"]["test_labels"])
    paired = delong_paired_test(labels, arms["platform"]["test_probabilities"], arms["baseline"]["test_probabilities"])
    report = {
        "host": platform.node(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": args.threads or torch.get_num_threads(),
        "config": args.config,
        "split": {"test_fraction": args.test_fraction, "seed": args.seed, "counts": counts, "by": "case"},
        "arms": arms,
        "paired_delong_platform_vs_baseline": paired.as_dict(),
        "published_reference": PUBLISHED,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(
        f"\ntest: {counts['test'][0]} cases ({counts['test'][1]} positive), carved from train by case; threshold on val"
    )
    print(
        f"{'arm':9} {'test AUC [DeLong 95 %]':>24} {'sens [95 %]':>20} {'spec [95 %]':>20} {'ECE':>6} "
        f"{'val AUC':>7} {'train s':>7} {'volumes':>7}"
    )
    for arm, r in arms.items():
        print(
            f"{arm:9} {r['auc']:.3f} [{r['auc_ci_low']:.3f}, {r['auc_ci_high']:.3f}]      "
            f"{r['sensitivity']:.2f} [{r['sensitivity_ci_low']:.2f}, {r['sensitivity_ci_high']:.2f}]     "
            f"{r['specificity']:.2f} [{r['specificity_ci_low']:.2f}, {r['specificity_ci_high']:.2f}] "
            f"{r['ece']:6.3f} {r['val_auc']:7.3f} {r['train_seconds']:7.0f} {r['samples_seen']:7d}"
        )
    print(
        f"paired DeLong, platform - baseline: dAUC {paired.difference:+.3f} "
        f"[{paired.low:+.3f}, {paired.high:+.3f}], z {paired.z:.2f}, p {paired.p_value:.3g}"
    )
    print(f"reference (not this test set): {PUBLISHED}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
