"""Per-site breakdown and the leave-one-site-out report (pure functions over case_metrics records)."""

from __future__ import annotations

import math

import pytest

from shared.evaluation.per_site import format_site_table, loso_report, per_site_summary


def records(case_id: str, anterior: float, posterior: float) -> list[dict]:
    return [
        {"case_id": case_id, "label_name": "anterior", "dice": anterior},
        {"case_id": case_id, "label_name": "posterior", "dice": posterior},
    ]


RECORDS = records("a1", 0.9, 0.7) + records("a2", 0.8, 0.8) + records("b1", 0.4, 0.2) + records("b2", 0.6, math.nan)
SITES = {"a1": "site-a", "a2": "site-a", "b1": "site-b", "b2": "site-b"}


def test_per_site_summary_groups_cases_by_site() -> None:
    summary = per_site_summary(RECORDS, SITES, n_boot=100)
    assert list(summary) == ["site-a", "site-b"]
    assert summary["site-a"]["cases"] == 2 and summary["site-a"]["dice_mean"] == pytest.approx(0.8)
    # b2's undefined posterior makes its case score undefined (as for the gate's per-case Dice): left out of
    # the site mean, while its anterior Dice still counts in the label mean
    assert summary["site-b"]["dice_mean"] == pytest.approx(0.3)
    assert summary["site-b"]["labels"]["anterior"]["mean"] == pytest.approx(0.5)
    posterior = summary["site-b"]["labels"]["posterior"]
    assert posterior["mean"] == pytest.approx(0.2) and posterior["n"] == 1 and posterior["n_undefined"] == 1
    with pytest.raises(ValueError, match="without a site"):
        per_site_summary(RECORDS, {"a1": "site-a"})
    assert per_site_summary([], SITES) == {}


def test_loso_report_weighs_sites_equally_and_names_the_worst() -> None:
    rows = per_site_summary(RECORDS + records("a3", 0.8, 0.8), {**SITES, "a3": "site-a"}, n_boot=100)
    report = loso_report({**rows, "site-c": {"cases": 0, "dice_mean": None, "labels": {}}})
    assert report["worst_site"] == "site-b" and report["worst_dice"] == pytest.approx(0.3)
    assert report["mean_over_sites"] == pytest.approx((0.8 + 0.3) / 2)  # site-c has no Dice: not averaged
    table = format_site_table(report["sites"], title="held-out site")
    assert table.splitlines()[0].split()[:4] == ["held-out", "site", "cases", "dice"]
    assert "site-c" in table and table.splitlines()[-1].split()[-1] == "-"
    assert loso_report({})["worst_site"] is None
