"""Site assignment and splits: properties over generated case sets (hypothesis) and worked examples."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.preprocessing.sites import (
    SiteAssignmentError,
    assign_by_quantile,
    assign_iid,
    assign_sites,
    parse_site_manifest,
)
from services.preprocessing.splits import (
    SplitCase,
    SplitError,
    holdout_split,
    make_splits,
    split_violations,
)


@st.composite
def case_sets(draw: st.DrawFn) -> list[SplitCase]:
    """10-60 patients with 1-3 cases each, 1-4 sites, labelled strata or none."""
    n_patients = draw(st.integers(10, 60))
    n_sites = draw(st.integers(1, 4))
    strata = draw(st.sampled_from([[None], ["1+2"], ["1+2", "1", "2"]]))
    cases = []
    for p in range(n_patients):
        site = f"site-{draw(st.integers(1, n_sites))}"
        for c in range(draw(st.integers(1, 3))):
            cases.append(SplitCase(f"p{p}-c{c}", f"p{p}", site, draw(st.sampled_from(strata))))
    return cases


@settings(max_examples=60, deadline=None)
@given(cases=case_sets(), seed=st.integers(0, 2**16))
def test_splits_are_patient_level_partitions(cases: list[SplitCase], seed: int) -> None:
    splits = make_splits(cases, val_fraction=0.2, test_fraction=0.2, k_folds=3, seed=seed)
    case_patient = {c.case_id: c.patient for c in cases}
    assert split_violations(splits, case_patient) == []
    every = sorted(case_patient)
    for name, parts in splits.items():
        # each split covers every case exactly once
        assert sorted(parts["train"] + parts["val"] + parts["test"]) == every, name
    # the k validation folds partition the non-test cases
    non_test = sorted(set(every) - set(splits["holdout"]["test"]))
    assert sorted(c for i in range(3) for c in splits[f"fold-{i}"]["val"]) == non_test
    sites = {c.site for c in cases}
    assert {n for n in splits if n.startswith("loso-")} == ({f"loso-{s}" for s in sites} if len(sites) > 1 else set())


@settings(max_examples=40, deadline=None)
@given(cases=case_sets(), seed=st.integers(0, 2**16))
def test_splits_are_deterministic_and_order_independent(cases: list[SplitCase], seed: int) -> None:
    first = make_splits(cases, k_folds=2, seed=seed)
    assert make_splits(list(reversed(cases)), k_folds=2, seed=seed) == first


@settings(max_examples=40, deadline=None)
@given(cases=case_sets(), seed=st.integers(0, 2**16))
def test_holdout_fractions_hold_globally_and_per_stratum(cases: list[SplitCase], seed: int) -> None:
    holdout = holdout_split(cases, val_fraction=0.2, test_fraction=0.2, seed=seed)
    patient_part = {}
    for part, ids in holdout.items():
        for case_id in ids:
            patient_part[case_id.split("-")[0]] = part
    n = len(patient_part)
    counts = Counter(patient_part.values())
    for part, fraction in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        assert abs(counts[part] - fraction * n) <= 1.0, (part, counts, n)
    # stratification: within each (site) stratum block each part is within ~1 of its share
    site_of = {c.patient: c.site for c in cases}
    for site in set(site_of.values()):
        members = [p for p in patient_part if site_of[p] == site]
        block = Counter(patient_part[p] for p in members)
        for part, fraction in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
            # strata inside a site (label signatures) can each round once
            assert abs(block[part] - fraction * len(members)) <= 4.0, (site, part, block, len(members))


def test_violation_oracle_detects_a_leak() -> None:
    case_patient = {"a1": "a", "a2": "a", "b1": "b"}
    leaky = {"holdout": {"train": ["a1", "b1"], "val": [], "test": ["a2"]}}
    assert split_violations(leaky, case_patient) == ["holdout: patient a in train and test"]


def test_split_errors_are_clear() -> None:
    cases = [SplitCase("c1", "p1", "s"), SplitCase("c2", "p2", "s")]
    with pytest.raises(SplitError, match="cannot fill 3"):
        holdout_split(cases, 0.2, 0.2)
    with pytest.raises(SplitError, match="val \\+ test < 1"):
        holdout_split(cases, 0.5, 0.5)
    with pytest.raises(SplitError, match="unique"):
        holdout_split([*cases, SplitCase("c1", "p3", "s")], 0.0, 0.0)


@settings(max_examples=40, deadline=None)
@given(n_patients=st.integers(5, 80), n_sites=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_iid_sites_are_balanced_and_seeded(n_patients: int, n_sites: int, seed: int) -> None:
    patients = [f"p{i}" for i in range(n_patients)]
    if n_patients < n_sites:
        return
    assignment = assign_iid(patients, n_sites, seed)
    counts = Counter(assignment.values())
    assert len(counts) == n_sites and max(counts.values()) - min(counts.values()) <= 1
    assert assign_iid(list(reversed(patients)), n_sites, seed) == assignment


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(0, 1e6, allow_nan=False), min_size=8, max_size=60, unique=True),
    n_sites=st.integers(2, 4),
    seed=st.integers(0, 2**16),
)
def test_quantile_sites_are_ordered_blocks(values: list[float], n_sites: int, seed: int) -> None:
    by_patient = {f"p{i}": v for i, v in enumerate(values)}
    assignment = assign_by_quantile(by_patient, n_sites, seed, heterogeneity=1.0)
    counts = Counter(assignment.values())
    assert max(counts.values()) - min(counts.values()) <= 1
    # pure non-IID: every value at site k is below every value at site k+1
    for k in range(1, n_sites):
        low = max(v for p, v in by_patient.items() if assignment[p] == f"site-{k}")
        high = min(v for p, v in by_patient.items() if assignment[p] == f"site-{k + 1}")
        assert low < high


def test_heterogeneity_dial_moves_from_quantiles_to_random() -> None:
    values = {f"p{i:03d}": float(i) for i in range(200)}

    def spread(h: float) -> float:
        """Mean value of site-1 minus mean value of site-2 (0 when the sites are alike)."""
        a = assign_by_quantile(values, 2, seed=7, heterogeneity=h)
        site = {s: [values[p] for p in a if a[p] == s] for s in ("site-1", "site-2")}
        return sum(site["site-2"]) / len(site["site-2"]) - sum(site["site-1"]) / len(site["site-1"])

    assert spread(1.0) == pytest.approx(100.0)
    assert 10 < spread(0.5) < 95
    assert abs(spread(0.0)) < 20


def test_site_manifest_and_errors() -> None:
    mapping = parse_site_manifest("case_id,site\nc1,north\nc2,south\n")
    assert assign_sites({"c1": "p1", "c2": "p2"}, "manifest", manifest=mapping) == {"c1": "north", "c2": "south"}
    by_patient = parse_site_manifest("patient,site\np1,north\n")
    with pytest.raises(SiteAssignmentError, match="does not cover 1 case"):
        assign_sites({"c1": "p1", "c2": "p2"}, "manifest", manifest=by_patient)
    with pytest.raises(SiteAssignmentError, match="header"):
        parse_site_manifest("id,where\nc1,north\n")
    with pytest.raises(SiteAssignmentError, match="two sites"):
        parse_site_manifest("case_id,site\nc1,north\nc1,south\n")
    with pytest.raises(SiteAssignmentError, match="cannot fill 3 sites"):
        assign_sites({"c1": "p1", "c2": "p2"}, "iid", n_sites=3)
    with pytest.raises(SiteAssignmentError, match="unknown site strategy"):
        assign_sites({"c1": "p1"}, "alphabetical")


def test_cases_of_one_patient_share_a_site() -> None:
    case_patient = {f"c{i}": f"p{i // 3}" for i in range(30)}
    values = {c: float(i) for i, c in enumerate(case_patient)}
    for strategy in ("iid", "intensity"):
        assignment = assign_sites(case_patient, strategy, n_sites=3, seed=1, case_values=values)
        for patient in set(case_patient.values()):
            assert len({assignment[c] for c, p in case_patient.items() if p == patient}) == 1
