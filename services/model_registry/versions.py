"""Model versions as the API shows them (lineage from MLflow), comparison, and applying a promotion.

Thin orchestration over :mod:`shared.registry` and the pure gate in :mod:`.promotion`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from services.model_registry.promotion import GateConfig, PromotionDecision, decide_promotion, paired_wilcoxon
from shared.registry import CHAMPION, LINEAGE_TAGS, get_version_by_alias, per_case_dice, run_id_of


class NotFoundError(LookupError):
    pass


def _iso(ms: int | None) -> str | None:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat() if ms else None


def get_version(client: MlflowClient, name: str, version: int) -> ModelVersion:
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise NotFoundError(f"model {name!r} has no version {version}") from exc


def version_summary(mv: ModelVersion) -> dict[str, Any]:
    return {
        "name": mv.name,
        "version": int(mv.version),
        "aliases": sorted(mv.aliases or []),
        "status": mv.status,
        "run_id": mv.run_id,
        "source": mv.source,
        "created_at": _iso(mv.creation_timestamp),
        "tags": dict(mv.tags or {}),
    }


def list_models(client: MlflowClient) -> list[dict[str, Any]]:
    models = []
    for rm in client.search_registered_models(max_results=1000):
        models.append(
            {
                "name": rm.name,
                "description": rm.description,
                "aliases": {alias: int(v) for alias, v in (rm.aliases or {}).items()},
                "latest_version": max((int(v.version) for v in rm.latest_versions or []), default=None),
                "updated_at": _iso(rm.last_updated_timestamp),
            }
        )
    return sorted(models, key=lambda m: m["name"])


def list_versions(client: MlflowClient, name: str) -> list[dict[str, Any]]:
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        raise NotFoundError(f"no registered model {name!r}") from exc
    versions = client.search_model_versions(f"name = '{name}'", max_results=10000)
    return sorted((version_summary(v) for v in versions), key=lambda v: v["version"], reverse=True)


def version_detail(client: MlflowClient, name: str, version: int, ui_url: str) -> dict[str, Any]:
    """Summary plus lineage: the run's parameters, final metrics, artifacts, lineage tags and per-case Dice."""
    mv = get_version(client, name, version)
    run = client.get_run(run_id_of(mv))
    artifacts: list[str] = []
    pending = [""]
    while pending:  # the run's artifact tree (small: model/, plots/, evaluation/)
        for info in client.list_artifacts(run_id_of(mv), pending.pop() or None):
            (pending.append(info.path) if info.is_dir else artifacts.append(info.path))
    cases = per_case_dice(mv, client)
    return {
        **version_summary(mv),
        "lineage": {tag: (mv.tags or {}).get(tag) or run.data.tags.get(tag) or None for tag in LINEAGE_TAGS},
        "run": {
            "run_id": mv.run_id,
            "experiment_id": run.info.experiment_id,
            "status": run.info.status,
            "params": dict(run.data.params),
            "metrics": dict(run.data.metrics),
            "artifacts": sorted(artifacts),
            "ui_url": f"{ui_url}/#/experiments/{run.info.experiment_id}/runs/{mv.run_id}",
        },
        "per_case_dice": cases,
    }


def compare_versions(client: MlflowClient, name: str, a: int, b: int) -> dict[str, Any]:
    """Version ``a`` against ``b``: tags, parameter differences, and the paired test on shared test cases."""
    va, vb = get_version(client, name, a), get_version(client, name, b)
    ra, rb = client.get_run(run_id_of(va)), client.get_run(run_id_of(vb))
    params = sorted(set(ra.data.params) | set(rb.data.params))
    differing = {
        p: {"a": ra.data.params.get(p), "b": rb.data.params.get(p)}
        for p in params
        if ra.data.params.get(p) != rb.data.params.get(p)
    }
    cases_a, cases_b = per_case_dice(va, client), per_case_dice(vb, client)
    paired = paired_wilcoxon(cases_a, cases_b) if cases_a and cases_b else None
    return {
        "a": version_summary(va),
        "b": version_summary(vb),
        "params_differing": differing,
        "metrics": {"a": dict(ra.data.metrics), "b": dict(rb.data.metrics)},
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
    client: MlflowClient, name: str, version: int, gate: GateConfig, principal: str, force: bool = False
) -> PromotionOutcome:
    """Run the gate for ``version`` against the current champion; move the alias if it passes (or ``force``).

    The decision and who made it are recorded as version tags, so the history stays in the registry.
    """
    mv = get_version(client, name, version)
    champion = get_version_by_alias(name, CHAMPION, client)
    previous = int(champion.version) if champion is not None else None
    if previous == int(mv.version):
        decision = PromotionDecision(True, [f"version {version} already is the champion"], {})
        return PromotionOutcome(decision, previous, promoted=False, forced=False)
    champion_cases = per_case_dice(champion, client) if champion is not None else None
    if champion is not None and champion_cases is None:
        champion_cases = {}  # a champion without evaluation: the gate reports "too few paired cases"
    decision = decide_promotion(per_case_dice(mv, client), champion_cases, gate)
    if not decision.promote and not force:
        return PromotionOutcome(decision, previous, promoted=False, forced=False)
    client.set_registered_model_alias(name, CHAMPION, str(mv.version))
    stamp = datetime.now(UTC).isoformat()
    client.set_model_version_tag(name, str(mv.version), "promoted_at", stamp)
    client.set_model_version_tag(name, str(mv.version), "promoted_by", principal)
    client.set_model_version_tag(name, str(mv.version), "promotion_forced", str(not decision.promote).lower())
    client.set_model_version_tag(name, str(mv.version), "promotion_reasons", "; ".join(decision.reasons)[:5000])
    if previous is not None:
        client.set_model_version_tag(name, str(previous), "replaced_as_champion_by", str(mv.version))
    return PromotionOutcome(decision, previous, promoted=True, forced=not decision.promote)
