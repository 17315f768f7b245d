"""Model versions as the API shows them (lineage from ``shared.registry.ModelRegistry``), comparison, promotion.

Thin orchestration over :mod:`shared.registry` and the pure gate in :mod:`.promotion`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from services.model_registry.promotion import GateConfig, PromotionDecision, decide_promotion, paired_wilcoxon
from shared.registry import CHAMPION, LINEAGE_TAGS, ModelRegistry, RegisteredVersion, RegistryError, run_id_of


class NotFoundError(LookupError):
    pass


def _iso(ms: int | None) -> str | None:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat() if ms else None


def get_version(registry: ModelRegistry, name: str, version: int) -> RegisteredVersion:
    try:
        return registry.get_version(name, version)
    except RegistryError as exc:
        raise NotFoundError(f"model {name!r} has no version {version}") from exc


def version_summary(mv: RegisteredVersion) -> dict[str, Any]:
    return {
        "name": mv.name,
        "version": int(mv.version),
        "aliases": sorted(mv.aliases),
        "status": mv.status,
        "run_id": mv.run_id,
        "source": mv.source,
        "created_at": _iso(mv.created_at_ms),
        "tags": dict(mv.tags),
    }


def list_models(registry: ModelRegistry) -> list[dict[str, Any]]:
    return [
        {
            "name": model.name,
            "description": model.description,
            "aliases": dict(model.aliases),
            "latest_version": model.latest_version,
            "updated_at": _iso(model.updated_at_ms),
        }
        for model in registry.list_models()
    ]


def list_versions(registry: ModelRegistry, name: str) -> list[dict[str, Any]]:
    try:
        registry.get_model(name)
    except RegistryError as exc:
        raise NotFoundError(f"no registered model {name!r}") from exc
    return sorted(
        (version_summary(v) for v in registry.search_versions(name)), key=lambda v: v["version"], reverse=True
    )


def version_detail(registry: ModelRegistry, name: str, version: int, ui_url: str) -> dict[str, Any]:
    """Summary plus lineage: the run's parameters, final metrics, artifacts, lineage tags and per-case Dice."""
    mv = get_version(registry, name, version)
    run = registry.get_run(run_id_of(mv))
    return {
        **version_summary(mv),
        "lineage": {tag: mv.tags.get(tag) or run.tags.get(tag) or None for tag in LINEAGE_TAGS},
        "run": {
            "run_id": mv.run_id,
            "experiment_id": run.experiment_id,
            "status": run.status,
            "params": dict(run.params),
            "metrics": dict(run.metrics),
            "artifacts": registry.walk_artifacts(run.run_id),
            "ui_url": f"{ui_url}/#/experiments/{run.experiment_id}/runs/{mv.run_id}",
        },
        "per_case_dice": registry.per_case_dice(mv),
    }


def compare_versions(registry: ModelRegistry, name: str, a: int, b: int) -> dict[str, Any]:
    """Version ``a`` against ``b``: tags, parameter differences, and the paired test on shared test cases."""
    va, vb = get_version(registry, name, a), get_version(registry, name, b)
    ra, rb = registry.get_run(run_id_of(va)), registry.get_run(run_id_of(vb))
    params = sorted(set(ra.params) | set(rb.params))
    differing = {
        p: {"a": ra.params.get(p), "b": rb.params.get(p)} for p in params if ra.params.get(p) != rb.params.get(p)
    }
    cases_a, cases_b = registry.per_case_dice(va), registry.per_case_dice(vb)
    paired = paired_wilcoxon(cases_a, cases_b) if cases_a and cases_b else None
    return {
        "a": version_summary(va),
        "b": version_summary(vb),
        "params_differing": differing,
        "metrics": {"a": dict(ra.metrics), "b": dict(rb.metrics)},
        "paired_test": {"hypothesis": "a worse than b (one-sided Wilcoxon on per-case Dice)", **paired}
        if paired
        else None,
    }


@dataclass
class PromotionOutcome:
    decision: PromotionDecision
    previous_champion: int | None
    promoted: bool
    forced: bool


def promote(
    registry: ModelRegistry, name: str, version: int, gate: GateConfig, principal: str, force: bool = False
) -> PromotionOutcome:
    """Run the gate for ``version`` against the current champion; move the alias if it passes (or ``force``).

    The decision and who made it are recorded as version tags, so the history stays in the registry.
    """
    mv = get_version(registry, name, version)
    champion = registry.get_version_by_alias(name, CHAMPION)
    previous = int(champion.version) if champion is not None else None
    if previous == int(mv.version):
        decision = PromotionDecision(True, [f"version {version} already is the champion"], {})
        return PromotionOutcome(decision, previous, promoted=False, forced=False)
    champion_cases = registry.per_case_dice(champion) if champion is not None else None
    if champion is not None and champion_cases is None:
        champion_cases = {}  # a champion without evaluation: the gate reports "too few paired cases"
    reports: list[dict[str, Any] | None] = [None, None]
    if gate.max_robustness_drop is not None:  # read only when the option is on: two artifact downloads
        reports = [registry.robustness_report(v) if v is not None else None for v in (mv, champion)]
    decision = decide_promotion(registry.per_case_dice(mv), champion_cases, gate, *reports)
    if not decision.promote and not force:
        return PromotionOutcome(decision, previous, promoted=False, forced=False)
    registry.set_alias(name, CHAMPION, mv.version)
    stamp = datetime.now(UTC).isoformat()
    registry.set_version_tag(name, mv.version, "promoted_at", stamp)
    registry.set_version_tag(name, mv.version, "promoted_by", principal)
    registry.set_version_tag(name, mv.version, "promotion_forced", str(not decision.promote).lower())
    registry.set_version_tag(name, mv.version, "promotion_reasons", "; ".join(decision.reasons)[:5000])
    if previous is not None:
        registry.set_version_tag(name, previous, "replaced_as_champion_by", str(mv.version))
    return PromotionOutcome(decision, previous, promoted=True, forced=not decision.promote)
