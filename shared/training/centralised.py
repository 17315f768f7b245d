"""Centralised training: every site's cases in one place, through the very same ``train_local``.

This is the baseline each federated result is compared against, so it must not be a second training
loop. ``python -m shared.training.centralised --dataset ds-… --config hippocampus_unet --out out/central``
trains on ``holdout.train`` of all sites and validates on ``holdout.val``; under
``torchrun --nproc_per_node N -m shared.training.centralised …`` the same command runs data-parallel
(DDP, gloo on CPU, NCCL on GPUs) and only rank 0 writes ``weights.pt``, ``metrics.json`` and the
per-epoch ``checkpoint.pt`` (a rerun with the same ``--out`` resumes from it).

After training, rank 0 scores the model on ``holdout.test`` of all sites with
``shared.evaluation.held_out.evaluate_state`` and, with ``--register``, logs the run to MLflow and registers
a version through ``shared.registry.register_evaluated_version`` (strategy tag ``centralised``): the very
functions the federated aggregator uses, so the baseline and every federated result are comparable. The
test Dice is also broken down by site (``test_per_site`` in ``metrics.json``, ``test/site/{site}/dice_mean``
on the run).

``--loso`` trains once per ``loso-{site}`` split of the dataset version (test = every patient of that site,
the other sites train) into ``--out``/``loso-{site}`` and writes ``--out``/``loso.json``: the Dice at each
held-out site, the mean over sites and the worst one (:mod:`shared.evaluation.per_site`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from shared.evaluation.held_out import evaluate_state, held_out_metrics, label_names, resolve_postprocessing
from shared.evaluation.per_site import LOSO_PREFIX, format_site_table, loso_report, per_site_summary
from shared.evaluation.report import write_json
from shared.settings import VoxelflowSettings
from shared.storage import open_object_store
from shared.training.config import load_config
from shared.training.data import UnknownDatasetVersion, load_site_data
from shared.training.local import EpochRecord, train_local
from shared.training.plans import plan_for_version
from shared.training.state import state_from_bytes, state_to_bytes

log = logging.getLogger("voxelflow.training.centralised")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="voxelflow train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="dataset version id (ds-…)")
    parser.add_argument("--config", default="hippocampus_unet", help="bundled config name or YAML path")
    parser.add_argument("--out", type=Path, default=Path("out/centralised"), help="output directory")
    parser.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    parser.add_argument("--storage-url", default=None, help="object store (default: VOXELFLOW_STORAGE_URL)")
    parser.add_argument(
        "--no-plan",
        action="store_true",
        help="do not fill the fields the config leaves unset from the version's plan (`voxelflow plan ds-…`)",
    )
    parser.add_argument("--split", default="holdout")
    parser.add_argument(
        "--loso",
        action="store_true",
        help="leave-one-site-out: one training per loso-{site} split, the Dice per held-out site in OUT/loso.json",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads per process")
    parser.add_argument(
        "--register", action="store_true", help="log to MLflow and register a model version (alias candidate)"
    )
    parser.add_argument("--tracking-uri", default=None, help="MLflow server (default: VOXELFLOW_MLFLOW_TRACKING_URI)")
    parser.add_argument("--experiment", default="voxelflow-centralised", help="MLflow experiment")
    parser.add_argument("--model-name", default="voxelflow-segmentation", help="registered model name")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config)
    store = open_object_store(args.storage_url or VoxelflowSettings().storage_url)
    plan_fields: list[str] = []
    if not args.no_plan:  # the fields the config leaves unset come from the version's plan
        config, plan_fields = plan_for_version(store, args.dataset, config)
        if plan_fields:
            log.info("from the plan of %s: %s", args.dataset, ", ".join(plan_fields))
    data = load_site_data(store, args.dataset, None, args.split)
    rank = int(os.environ.get("RANK", "0"))
    out: Path = args.out
    checkpoint_path = out / "checkpoint.pt"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    def load_checkpoint() -> dict[str, Any] | None:
        return state_from_bytes(checkpoint_path.read_bytes()) if checkpoint_path.exists() else None

    def save_checkpoint(checkpoint: dict[str, Any]) -> None:
        tmp = checkpoint_path.with_suffix(".tmp")
        tmp.write_bytes(state_to_bytes(checkpoint))
        tmp.replace(checkpoint_path)  # atomic: a kill never leaves half a checkpoint

    def progress(record: EpochRecord) -> None:
        print(json.dumps({"epoch": record.epoch, "loss": record.train_loss, "val_dice": record.val_dice}), flush=True)

    result = train_local(
        config,
        data.train,
        data.val,
        None,
        augment=data.augment,
        epochs=args.epochs,
        load_checkpoint=load_checkpoint,
        save_checkpoint=save_checkpoint,
        progress=progress,
    )
    summary = {
        "dataset": args.dataset,
        "config": config.model_dump(mode="json"),
        "plan_fields": plan_fields,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "num_samples": result.num_samples,
        "metrics": result.metrics,
        "stopped_early": result.stopped_early,
        "history": [asdict(h) for h in result.history],
    }
    if rank == 0:
        weights = result.kept_state(config.keep)  # early stopping returns the best model, not the last
        summary["kept_epoch"] = result.best_epoch if weights is result.best_state_dict else len(result.history)
        config, evidence = resolve_postprocessing(store, data.manifest, config, weights, split=args.split)
        summary["postprocessing"] = evidence
        summary["config"] = config.model_dump(mode="json")
        (out / "weights.pt").write_bytes(state_to_bytes(weights))
        records = evaluate_state(store, data.manifest, config, weights, split=args.split, part="test")
        summary["test"] = held_out_metrics(records)
        summary["test_per_site"] = per_site_summary(records, {c.case_id: c.site for c in data.manifest.cases})
        write_json(out / "test-per-case.json", {"records": records})
        if args.register:
            summary["registered"] = register(args, config, data.manifest, result, records, plan_fields)
        (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


def register(
    args: argparse.Namespace,
    config: Any,
    manifest: Any,
    result: Any,
    records: list[dict[str, Any]],
    plan_fields: list[str] | None = None,
) -> dict:
    """Log the trained model to MLflow and register it with the lineage of a federated version."""
    from shared.registry import MetricPoint, open_registry

    registry = open_registry(args.tracking_uri)
    points = [MetricPoint("train_loss", h.train_loss, h.epoch) for h in result.history]
    points += [MetricPoint("val_dice", h.val_dice, h.epoch) for h in result.history if h.val_dice is not None]
    per_site = per_site_summary(records, {c.case_id: c.site for c in manifest.cases}) if records else {}
    points += [
        MetricPoint(f"test/site/{site}/dice_mean", row["dice_mean"], 0)
        for site, row in per_site.items()
        if row["dice_mean"] is not None
    ]
    run_id = registry.log_training_run(
        experiment=args.experiment,
        state_dict=result.kept_state(config.keep),
        training_config_yaml=config.to_yaml(),
        preprocessing_spec=manifest.preprocessing,
        preprocessing_hash=manifest.preprocessing_hash,
        labels=label_names(manifest.labels, config.num_classes),
        dataset_version=manifest.version_id,
        params={
            "training": config.model_dump(mode="json"),
            "split": args.split,
            "world_size": _world_size(),
            "plan_fields": ",".join(plan_fields or []) or "none",
        },
        metrics=points,
        tags={"strategy": "centralised", "federated_run_id": ""},
    )
    version = registry.register_evaluated_version(run_id, args.model_name, records or None)
    return {"run_id": run_id, "model_name": args.model_name, "version": version}


def run_loso(args: argparse.Namespace) -> dict[str, Any]:
    """One :func:`run` per ``loso-{site}`` split (each into ``--out``/``loso-{site}``, resumable like any run),
    then ``--out``/``loso.json`` with the test Dice at each held-out site. Sequential: each run already uses
    every process torchrun gives it."""
    from shared.datasets.manifest import ManifestError, load_manifest

    if args.split != "holdout":
        raise UnknownDatasetVersion("--loso trains on every loso-{site} split; it cannot be combined with --split")
    store = open_object_store(args.storage_url or VoxelflowSettings().storage_url)
    try:
        manifest = load_manifest(store, args.dataset)
    except (KeyError, ManifestError) as exc:
        raise UnknownDatasetVersion(f"unknown dataset version {args.dataset!r}: {exc}") from None
    splits = sorted(name for name in manifest.splits if name.startswith(LOSO_PREFIX))
    if not splits:
        raise UnknownDatasetVersion(
            f"dataset {args.dataset} has no leave-one-site-out splits (it has {sorted(manifest.splits)}): "
            "they need at least two sites"
        )
    held_out: dict[str, dict[str, Any]] = {}
    runs: dict[str, Any] = {}
    for split in splits:
        site = split.removeprefix(LOSO_PREFIX)
        log.info("leave-one-site-out: training without %s (%s)", site, split)
        summary = run(argparse.Namespace(**{**vars(args), "split": split, "out": args.out / split, "loso": False}))
        if int(os.environ.get("RANK", "0")) != 0:
            continue
        # the test part of loso-{site} is that site's cases only; an empty one (no labels) has no row
        held_out[site] = summary["test_per_site"].get(site, {"cases": 0, "dice_mean": None, "labels": {}})
        runs[site] = {"split": split, "out": str(args.out / split), "registered": summary.get("registered")}
    report = {"dataset": args.dataset, **loso_report(held_out), "runs": runs}
    if int(os.environ.get("RANK", "0")) == 0:
        (args.out / "loso.json").write_text(json.dumps(report, indent=2))
        print(format_site_table(report["sites"], title="held-out site"))
        mean = report["mean_over_sites"]
        print(f"mean over sites {mean:.4f}; worst {report['worst_site']}" if mean is not None else "no Dice defined")
    return report


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    try:
        run_loso(args) if args.loso else run(args)
        if torch.distributed.is_initialized():
            # no rank tears the group down while another still talks to it: gloo aborts the process
            # ("terminate called without an active exception") when its pair threads lose the peer
            torch.distributed.barrier()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
