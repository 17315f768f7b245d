"""Trained weights evaluated on a dataset version's cached, preprocessed cases (one implementation for all).

Why here and in the preprocessed space: the federated aggregator (global model on each site's
``holdout.val`` after every round, and on ``holdout.test`` at the end) and the centralised baseline
(``voxelflow train``) must score a model the same way, or the comparison between them is meaningless.
Both call :func:`evaluate_state` on the cases the manifest names; the cached case is exactly what the
network was trained on (the dataset's deterministic preprocessing), so no inversion is needed, and the
voxel spacing for HD95/ASD comes from the cached affine. The windows run through the inference service's
own predictor (``shared.inference.SlidingWindowPredictor``), so the test Dice recorded at registration is
that of the served window, overlap and blending. ``voxelflow evaluate`` (``runner.py``) is the
other view: a registered model on raw NIfTI files in the hospital's own geometry.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from shared.evaluation.metrics import case_metrics, mean_dice_per_case, summarise
from shared.inference import (
    InferenceBackend,
    SlidingWindowPredictor,
    TorchModuleBackend,
    keep_largest_components,
    predict_labels,
)

_CACHE_LOCK = threading.Lock()
_CASE_CACHE: dict[tuple[str, ...], list[dict[str, Any]]] = {}
_CACHE_ENTRIES = 16


def spacing_of(affine: Any) -> list[float]:
    """Voxel size (mm) along each axis: the lengths of the affine's first three columns."""
    matrix = np.asarray(torch.as_tensor(affine, dtype=torch.float64))[:3, :3]
    return [float(v) for v in np.linalg.norm(matrix, axis=0)]


def label_names(labels: Mapping[Any, str] | None, num_classes: int) -> dict[int, str]:
    """The manifest's label names, or ``label-k`` for each class when the manifest names none."""
    named = {int(k): str(v) for k, v in (labels or {}).items()}
    return named if any(k != 0 for k in named) else {k: f"label-{k}" for k in range(num_classes)}


def _predictions(
    network: torch.nn.Module | InferenceBackend,
    cases: Iterable[Mapping[str, Any]],
    roi_size: Sequence[int],
    sw_batch_size: int,
    overlap: float,
    mirror_axes: Sequence[int],
) -> Iterable[tuple[Mapping[str, Any], np.ndarray]]:
    backend = TorchModuleBackend(network) if isinstance(network, torch.nn.Module) else network
    predictor = SlidingWindowPredictor(
        backend, roi_size, sw_batch_size=sw_batch_size, overlap=overlap, mirror_axes=mirror_axes
    )
    for case in cases:
        if case.get("label") is None:
            raise ValueError(f"case {case.get('case_id')!r} has no label: it cannot be evaluated")
        yield case, predict_labels(predictor, case["image"]).numpy()[0].astype(np.uint8)


def _case_records(case: Mapping[str, Any], prediction: np.ndarray, labels: Mapping[int, str]) -> list[dict[str, Any]]:
    spacing = spacing_of(case["affine"]) if case.get("affine") is not None else None
    return [{"case_id": str(case["case_id"]), **r} for r in case_metrics(prediction, case["label"], labels, spacing)]


def evaluate_network(
    network: torch.nn.Module | InferenceBackend,
    cases: Iterable[Mapping[str, Any]],
    labels: Mapping[int, str],
    roi_size: Sequence[int],
    sw_batch_size: int = 1,
    overlap: float = 0.25,
    *,
    mirror_axes: Sequence[int] = (),
    largest_component_labels: Sequence[int] = (),
) -> list[dict[str, Any]]:
    """:func:`case_metrics` records (with ``case_id``) of ``network`` on cached cases (``image``, ``label``).

    The windows go through the inference service's own predictor (``shared.inference``: the same sliding
    window, overlap, Gaussian blending, test-time mirroring and argmax as served, then the same
    largest-component filter of the labels named), over the network in this process — or over any
    backend given instead, e.g. ONNX Runtime on the export.
    """
    keep = {int(v): labels[int(v)] for v in largest_component_labels if int(v) in labels}
    records: list[dict[str, Any]] = []
    for case, prediction in _predictions(network, cases, roi_size, sw_batch_size, overlap, mirror_axes):
        if keep:
            prediction = keep_largest_components(prediction, keep)
        records.extend(_case_records(case, prediction, labels))
    return records


def choose_largest_component_labels(
    network: torch.nn.Module | InferenceBackend,
    cases: Sequence[Mapping[str, Any]],
    labels: Mapping[int, str],
    roi_size: Sequence[int],
    sw_batch_size: int = 1,
    overlap: float = 0.25,
    *,
    mirror_axes: Sequence[int] = (),
) -> tuple[list[int], dict[str, dict[str, float]]]:
    """The labels whose largest-component filter raises their mean Dice on ``cases`` (validation), as
    nnU-Net chooses its post-processing, and per label the mean Dice without and with the filter.

    Each case is predicted once; filtering is per label and independent (removed voxels become
    background), so one filtered mask gives every label's filtered Dice.
    """
    raw: list[dict[str, Any]] = []
    filtered: list[dict[str, Any]] = []
    foreground = {int(v): name for v, name in labels.items() if int(v) != 0}
    for case, prediction in _predictions(network, cases, roi_size, sw_batch_size, overlap, mirror_axes):
        raw.extend(_case_records(case, prediction, labels))
        filtered.extend(_case_records(case, keep_largest_components(prediction, foreground), labels))

    def mean_by_label(records: list[dict[str, Any]]) -> dict[str, float]:
        values: dict[str, list[float]] = {}
        for record in records:
            if math.isfinite(float(record["dice"])):
                values.setdefault(str(record["label_name"]), []).append(float(record["dice"]))
        return {name: float(np.mean(v)) for name, v in values.items()}

    before, after = mean_by_label(raw), mean_by_label(filtered)
    chosen = [v for v, name in sorted(foreground.items()) if after.get(name, -1.0) > before.get(name, math.inf)]
    report = {name: {"without": before[name], "with": after.get(name, float("nan"))} for name in before}
    return chosen, report


def cached_cases(store: Any, manifest: Any, split: str, part: str, site: str | None = None) -> list[dict[str, Any]]:
    """The cached dicts of one part of a split (optionally one site), kept in memory between calls.

    Why a process cache: the aggregator scores every round's global model on the same validation cases;
    a cache entry is immutable (keyed by the preprocessing hash and the manifest's content-derived id).
    """
    from shared.datasets import CachedCaseDataset

    key = (manifest.version_id, manifest.preprocessing_hash, split, part, site or "*")
    with _CACHE_LOCK:
        if key in _CASE_CACHE:
            return _CASE_CACHE[key]
    records = manifest.select(split, part, site)
    dataset = CachedCaseDataset(store, records, manifest.preprocessing_hash)
    if records:
        dataset.prefetch()  # CacheError names the first case not preprocessed yet
    cases = [dict(dataset[i]) for i in range(len(dataset))]
    with _CACHE_LOCK:
        if len(_CASE_CACHE) >= _CACHE_ENTRIES:
            _CASE_CACHE.pop(next(iter(_CASE_CACHE)))
        _CASE_CACHE[key] = cases
    return cases


def network_from_state(config: Any, state: Mapping[str, Any]) -> torch.nn.Module:
    """``build_network`` of the training config with ``state`` loaded strictly; ValueError when it does not fit."""
    from shared.training import build_network

    network = build_network(config, config.in_channels, config.num_classes)
    tensors = {k: torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for k, v in state.items()}
    try:
        network.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"weights do not fit the configured network ({config.network.name}): {exc}") from None
    network.eval()
    return network


def evaluate_state(
    store: Any,
    manifest: Any,
    config: Any,
    state: Mapping[str, Any],
    *,
    split: str = "holdout",
    part: str = "test",
    site: str | None = None,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Per-case records of the weights ``state`` (torch or numpy) on ``split.part`` (of ``site``, or all sites).

    ``threads`` limits torch's intra-op threads for the call (the aggregator scores on a shared CPU).
    """
    network = network_from_state(config, state)
    cases = cached_cases(store, manifest, split, part, site)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        val, inference = config.validation, config.inference
        return evaluate_network(
            network,
            cases,
            label_names(manifest.labels, config.num_classes),
            val.roi_size,
            val.sw_batch_size,
            val.overlap,
            mirror_axes=inference.mirror_axes,
            largest_component_labels=inference.largest_component_labels or (),
        )
    finally:
        torch.set_num_threads(previous)


def resolve_postprocessing(
    store: Any,
    manifest: Any,
    config: Any,
    state: Mapping[str, Any],
    *,
    split: str = "holdout",
    threads: int | None = None,
) -> tuple[Any, dict[str, dict[str, float]]]:
    """``config`` with ``inference.largest_component_labels`` chosen on ``split.val`` when it is unset (None),
    and the per-label evidence; a config that names its labels, or a split without validation cases, is
    returned as it is (with no filtering chosen in the latter case)."""
    inference = config.inference
    if inference.largest_component_labels is not None:
        return config, {}
    cases = cached_cases(store, manifest, split, "val")
    chosen: list[int] = []
    report: dict[str, dict[str, float]] = {}
    if cases:
        previous = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            val = config.validation
            chosen, report = choose_largest_component_labels(
                network_from_state(config, state),
                cases,
                label_names(manifest.labels, config.num_classes),
                val.roi_size,
                val.sw_batch_size,
                val.overlap,
                mirror_axes=inference.mirror_axes,
            )
        finally:
            torch.set_num_threads(previous)
    resolved = inference.model_copy(update={"largest_component_labels": chosen})
    return config.model_copy(update={"inference": resolved}), report


def mean_dice(records: Sequence[Mapping[str, Any]]) -> float | None:
    """Mean over cases of each case's mean foreground Dice (the promotion gate's score); None without cases."""
    scores = mean_dice_per_case(records)
    return float(np.mean(list(scores.values()))) if scores else None


def held_out_metrics(
    records: Sequence[Mapping[str, Any]], prefix: str = "test", n_boot: int = 1000
) -> dict[str, float]:
    """MLflow metrics of held-out records: ``{prefix}/dice_mean`` and per label the mean Dice with its
    bootstrap 95 % CI (``{prefix}/{label}/dice``, ``…/dice_ci_low``, ``…/dice_ci_high``); undefined bounds
    (fewer than two cases) are left out rather than logged as NaN."""
    out: dict[str, float] = {}
    overall = mean_dice(records)
    if overall is None:
        return out
    out[f"{prefix}/dice_mean"] = overall
    out[f"{prefix}/cases"] = float(len(mean_dice_per_case(records)))
    for label, per_metric in summarise(records, n_boot=n_boot, metrics=("dice",)).items():
        stats = per_metric["dice"]
        for name, key in (("dice", "mean"), ("dice_ci_low", "ci_low"), ("dice_ci_high", "ci_high")):
            value = float(stats[key])
            if math.isfinite(value):
                out[f"{prefix}/{label}/{name}"] = value
    return out
