"""Evaluation of the global model: on each site's validation split after every round, on the test split at the end.

Thin: the scoring is ``shared.evaluation.held_out`` (the same code the centralised baseline uses), on the
cached preprocessed cases of the run's dataset version. It runs on the aggregator's CPU, so torch's
threads are limited by ``VOXELFLOW_EVALUATION_TORCH_THREADS`` and the cases stay in memory between rounds.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shared.storage import ObjectStore
from shared.tasks import PermanentTaskError


def evaluation_available() -> str | None:
    """None when the shared evaluation stack is importable, else why not."""
    try:
        import shared.datasets
        import shared.evaluation.held_out
        import shared.training  # noqa: F401
    except ImportError as exc:
        return f"evaluation needs shared.datasets, shared.training and shared.evaluation: {exc}"
    return None


def _inputs(store: ObjectStore, run: Any) -> tuple[Any, Any]:
    from shared.datasets import ManifestError, load_manifest
    from shared.training import TrainingConfig

    try:
        manifest = load_manifest(store, run.dataset_version)
    except (KeyError, ManifestError) as exc:
        raise PermanentTaskError(f"evaluation: dataset version {run.dataset_version}: {exc}") from exc
    return manifest, TrainingConfig.model_validate(run.training_config)


def _records(
    store: ObjectStore,
    run: Any,
    state: dict[str, np.ndarray],
    part: str,
    site: str | None,
    threads: int,
    config: Any | None = None,
) -> list[dict[str, Any]]:
    from shared.datasets import CacheError
    from shared.evaluation.held_out import evaluate_state

    manifest, run_config = _inputs(store, run)
    config = config or run_config
    try:
        return evaluate_state(store, manifest, config, state, part=part, site=site, threads=threads)
    except (ValueError, CacheError) as exc:  # weights that do not fit the config; a case not preprocessed
        raise PermanentTaskError(f"evaluation of the global model on holdout.{part}: {exc}") from exc


def summarise_sites(per_site: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Round metrics from each site's records: per site mean Dice (overall and per label) and case count;
    ``mean`` pools every validation case (each case counts once, whichever site holds it)."""
    from shared.evaluation import mean_dice_per_case

    sites: dict[str, dict[str, float]] = {}
    pooled: dict[str, float] = {}
    for site, records in sorted(per_site.items()):
        scores = mean_dice_per_case(records)
        if not scores:
            continue
        pooled.update({f"{site}/{case}": v for case, v in scores.items()})
        values: dict[str, float] = {"val_dice": float(np.mean(list(scores.values()))), "val_cases": float(len(scores))}
        by_label: dict[str, list[float]] = {}
        for record in records:
            by_label.setdefault(str(record["label_name"]), []).append(float(record["dice"]))
        values.update({f"val_dice_{label}": float(np.mean(v)) for label, v in sorted(by_label.items())})
        sites[site] = values
    if not pooled:
        return {}
    mean = float(np.mean(list(pooled.values())))
    return {
        "sites": sites,
        "mean": {"val_dice": mean, "val_cases": float(len(pooled))},
        "val_dice": {site: values["val_dice"] for site, values in sites.items()},
        "val_dice_mean": mean,
    }


def evaluate_on_sites(store: ObjectStore, run: Any, state: dict[str, np.ndarray], threads: int = 1) -> dict[str, Any]:
    """``{"sites": {site: {"val_dice", "val_cases", "val_dice_<label>"}}, "mean": {...}, "val_dice": {site: x},
    "val_dice_mean": x}`` of the global weights ``state`` on each site's ``holdout.val``; {} when no site has one."""
    return summarise_sites({site: _records(store, run, state, "val", site, threads) for site in run.sites})


def resolve_final_config(store: ObjectStore, run: Any, state: dict[str, np.ndarray], threads: int = 1) -> dict:
    """The run's training config with its post-processing chosen on ``holdout.val`` for the final weights
    (``shared.evaluation.held_out.resolve_postprocessing``): what the model is registered, tested and served with."""
    from shared.datasets import CacheError
    from shared.evaluation.held_out import resolve_postprocessing

    manifest, config = _inputs(store, run)
    try:
        resolved, _ = resolve_postprocessing(store, manifest, config, state, threads=threads)
    except (ValueError, CacheError) as exc:
        raise PermanentTaskError(f"choosing the post-processing on holdout.val: {exc}") from exc
    return dict(resolved.model_dump(mode="json"))


def evaluate_on_test(
    store: ObjectStore, run: Any, state: dict[str, np.ndarray], threads: int = 1, config: dict | None = None
) -> list[dict]:
    """Per-case records of the final weights on ``holdout.test`` of all sites (what the promotion gate compares),
    under ``config`` (the resolved final config; default the run's).

    All sites, not only the run's: the test set is the dataset version's, so every run and the centralised
    baseline on that version are scored on the same cases."""
    from shared.training import TrainingConfig

    resolved = TrainingConfig.model_validate(config) if config is not None else None
    return list(_records(store, run, state, "test", None, threads, resolved))


def summarise_test(records: list[dict[str, Any]], case_site: dict[str, str], n_boot: int = 1000) -> dict[str, Any]:
    """The test Dice of the chosen model, pooled over every test case and per site (the site that holds each
    case in the dataset version): ``{"pooled": {dice_mean, cases, <label>/dice, <label>/dice_ci_low, …},
    "sites": {site: {…the same…}}}``; {} without records.

    Why per site: a pooled mean hides a site the model fails (a non-IID split puts one scanner's intensities
    or the smallest volumes at one site); the per-site numbers are what tells FedAvg from FedBN there."""
    from shared.evaluation.held_out import held_out_metrics

    def stripped(subset: list[dict[str, Any]]) -> dict[str, float]:
        return {key.split("/", 1)[1]: value for key, value in held_out_metrics(subset, "t", n_boot).items()}

    if not records:
        return {}
    by_site: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_site.setdefault(case_site.get(str(record["case_id"]), "unknown"), []).append(record)
    return {"pooled": stripped(records), "sites": {site: stripped(subset) for site, subset in sorted(by_site.items())}}


def case_sites(store: ObjectStore, run: Any) -> dict[str, str]:
    """case id → site for the dataset version's cases (every site's, as the test split is)."""
    manifest, _ = _inputs(store, run)
    return {case.case_id: case.site for case in manifest.cases}
