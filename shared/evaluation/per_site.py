"""Per-site generalisation: held-out Dice broken down by the site each case came from, and the
leave-one-site-out (LOSO) report. Pure functions over :func:`~shared.evaluation.metrics.case_metrics` records.

Why per site: a pooled test Dice hides the hospital a model fails at (another scanner, protocol or
population); a federated model is only as good as its worst site. Why LOSO: the ``loso-{site}`` splits
(``services/preprocessing/splits.py``: test = every patient of that site, the other sites train) measure how a
model does at a hospital it never saw, which is what a new site joining the federation gets on day one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from shared.evaluation.metrics import mean_dice_per_case, summarise

LOSO_PREFIX = "loso-"


def per_site_summary(
    records: Sequence[Mapping[str, Any]], site_of: Mapping[str, str], n_boot: int = 1000, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """``{site: {"cases", "dice_mean", "labels": {label: {mean, ci_low, ci_high, n}}}}`` of ``records``.

    ``dice_mean`` is the mean over the site's cases of each case's mean foreground Dice (the promotion gate's
    score; a case with an undefined label Dice has no score and is left out, as for the gate), None when none of
    its cases has one. A case missing from ``site_of`` is an error: a
    record without a site would silently vanish from every row."""
    unknown = sorted({str(r["case_id"]) for r in records} - set(site_of))
    if unknown:
        raise ValueError(f"cases without a site: {unknown[:5]}")
    by_site: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        by_site.setdefault(site_of[str(record["case_id"])], []).append(record)
    out: dict[str, dict[str, Any]] = {}
    for site in sorted(by_site):
        site_records = by_site[site]
        scores = [v for v in mean_dice_per_case(site_records).values() if math.isfinite(v)]
        labels = summarise(site_records, n_boot=n_boot, seed=seed, metrics=("dice",))
        out[site] = {
            "cases": len({str(r["case_id"]) for r in site_records}),
            "dice_mean": float(np.mean(scores)) if scores else None,
            "labels": {label: dict(per_metric["dice"]) for label, per_metric in labels.items()},
        }
    return out


def loso_report(held_out: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The LOSO table from ``{held-out site: its per_site_summary row}``: every site, the mean over sites
    (each site weighs the same, however many cases it has) and the worst site."""
    rows = {site: dict(row) for site, row in sorted(held_out.items())}
    defined = {site: row["dice_mean"] for site, row in rows.items() if row.get("dice_mean") is not None}
    worst = min(defined, key=lambda s: defined[s]) if defined else None
    return {
        "sites": rows,
        "mean_over_sites": float(np.mean(list(defined.values()))) if defined else None,
        "worst_site": worst,
        "worst_dice": defined[worst] if worst is not None else None,
    }


def format_site_table(rows: Mapping[str, Mapping[str, Any]], title: str = "site") -> str:
    """A plain-text table: site, cases, mean Dice and each label's mean Dice."""
    labels = sorted({label for row in rows.values() for label in row.get("labels", {})})
    header = f"{title:<20}{'cases':>6}{'dice':>9}" + "".join(f"{label[:12]:>13}" for label in labels)
    lines = [header]
    for site, row in rows.items():
        dice = row.get("dice_mean")
        cells = "".join(f"{_fmt(row.get('labels', {}).get(label, {}).get('mean')):>13}" for label in labels)
        lines.append(f"{site:<20}{row.get('cases', 0):>6}{_fmt(dice):>9}{cells}")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else "-"
