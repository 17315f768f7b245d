"""Train/val/test, k-fold and leave-one-site-out splits (pure functions, no I/O).

Everything is decided per **patient**, never per case: two scans of one patient in train and test would
leak the patient's anatomy into the test score. Stratification keeps each (site, label signature) group
spread over the parts in proportion, so every site has validation cases for federated training and rare
label combinations are not all in one part. Deterministic for a given seed and independent of input order.

Split names follow docs/contracts.md: ``holdout`` (train/val/test), ``fold-{k}`` (k-fold over the non-test
patients, ``val`` = fold k, ``test`` = the holdout test), ``loso-{site}`` (``test`` = that site's patients).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

PARTS = ("train", "val", "test")
Splits = dict[str, dict[str, list[str]]]


class SplitError(ValueError):
    """The requested split cannot be made from these cases (too few patients, bad fractions)."""


@dataclass(frozen=True)
class SplitCase:
    case_id: str
    patient: str
    site: str
    stratum: str | None = None  # e.g. the set of label values present; None when unlabelled


def _seeded_rank(seed: int, key: str) -> str:
    """A stable pseudo-random order key (no global RNG state, independent of iteration order)."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def _patients(cases: Sequence[SplitCase]) -> dict[str, list[SplitCase]]:
    grouped: dict[str, list[SplitCase]] = {}
    for case in cases:
        grouped.setdefault(case.patient, []).append(case)
    if len({c.case_id for c in cases}) != len(cases):
        duplicated = [c for c, n in Counter(c.case_id for c in cases).items() if n > 1]
        raise SplitError(f"case ids must be unique; duplicated: {duplicated[:5]}")
    return grouped


def _patient_stratum(patient_cases: Sequence[SplitCase]) -> str:
    sites = sorted({c.site for c in patient_cases})
    strata = sorted({c.stratum or "" for c in patient_cases})
    return f"{sites[0]}|{'+'.join(strata)}"


def _stratified_order(grouped: Mapping[str, Sequence[SplitCase]], seed: int) -> list[str]:
    """Patients ordered by stratum, shuffled (seeded) within it: dealing this order keeps strata balanced."""
    return sorted(grouped, key=lambda p: (_patient_stratum(grouped[p]), _seeded_rank(seed, p)))


def _deal(order: Sequence[str], fractions: Mapping[str, float]) -> dict[str, str]:
    """Give each patient, in order, to the part furthest below its target share ("largest deficit").

    Over any contiguous run (a stratum) each part's count stays within about one of its share, and the
    totals match the fractions as closely as integers allow.
    """
    counts = dict.fromkeys(fractions, 0)
    assignment: dict[str, str] = {}
    for index, patient in enumerate(order):
        part = max(fractions, key=lambda p: (fractions[p] * (index + 1) - counts[p], fractions[p]))
        counts[part] += 1
        assignment[patient] = part
    return assignment


def _cases_of(grouped: Mapping[str, Sequence[SplitCase]], patients: Iterable[str]) -> list[str]:
    return sorted(c.case_id for p in patients for c in grouped[p])


def holdout_split(
    cases: Sequence[SplitCase], val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
) -> dict[str, list[str]]:
    """Patient-level train/val/test, stratified by (site, label signature)."""
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise SplitError(f"need 0 <= val, test and val + test < 1; got val={val_fraction}, test={test_fraction}")
    grouped = _patients(cases)
    wanted_parts = 1 + (val_fraction > 0) + (test_fraction > 0)
    if len(grouped) < wanted_parts:
        raise SplitError(f"{len(grouped)} patient(s) cannot fill {wanted_parts} non-empty parts")
    fractions = {"train": 1 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}
    fractions = {part: f for part, f in fractions.items() if f > 0}
    assignment = _deal(_stratified_order(grouped, seed), fractions)
    return {part: _cases_of(grouped, [p for p, a in assignment.items() if a == part]) for part in PARTS}


def kfold_splits(
    cases: Sequence[SplitCase], holdout: Mapping[str, Sequence[str]], k: int, seed: int = 0
) -> dict[str, dict[str, list[str]]]:
    """``fold-i``: val = fold i of the non-test patients (stratified round-robin), train = the other folds."""
    if k < 2:
        raise SplitError(f"k-fold needs k >= 2, got {k}")
    grouped = _patients(cases)
    test_cases = set(holdout.get("test", []))
    pool = {p: cs for p, cs in grouped.items() if not any(c.case_id in test_cases for c in cs)}
    if len(pool) < k:
        raise SplitError(f"{len(pool)} non-test patient(s) cannot fill {k} folds")
    order = _stratified_order(pool, seed)
    fold_of = {patient: index % k for index, patient in enumerate(order)}
    test = sorted(test_cases)
    return {
        f"fold-{i}": {
            "train": _cases_of(pool, [p for p, f in fold_of.items() if f != i]),
            "val": _cases_of(pool, [p for p, f in fold_of.items() if f == i]),
            "test": test,
        }
        for i in range(k)
    }


def leave_one_site_out(
    cases: Sequence[SplitCase], holdout: Mapping[str, Sequence[str]]
) -> dict[str, dict[str, list[str]]]:
    """``loso-{site}``: test = every patient seen at that site; the others keep their holdout val, the rest train."""
    grouped = _patients(cases)
    sites = sorted({c.site for c in cases})
    if len(sites) < 2:
        return {}
    val_cases = set(holdout.get("val", []))
    result = {}
    for site in sites:
        held_out = {p for p, cs in grouped.items() if any(c.site == site for c in cs)}
        others = [p for p in grouped if p not in held_out]
        in_val = {p for p in others if any(c.case_id in val_cases for c in grouped[p])}
        result[f"loso-{site}"] = {
            "train": _cases_of(grouped, [p for p in others if p not in in_val]),
            "val": _cases_of(grouped, in_val),
            "test": _cases_of(grouped, held_out),
        }
    return result


def make_splits(
    cases: Sequence[SplitCase],
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    k_folds: int = 5,
    seed: int = 0,
    loso: bool = True,
) -> Splits:
    """Every split a dataset version stores: ``holdout``, ``fold-0..k-1`` (k_folds >= 2) and ``loso-*``."""
    holdout = holdout_split(cases, val_fraction, test_fraction, seed)
    splits: Splits = {"holdout": holdout}
    if k_folds >= 2:
        splits.update(kfold_splits(cases, holdout, k_folds, seed))
    if loso:
        splits.update(leave_one_site_out(cases, holdout))
    return splits


def split_violations(splits: Mapping[str, Mapping[str, Sequence[str]]], case_patient: Mapping[str, str]) -> list[str]:
    """Every way the splits break the rules: a patient in two parts of one split, a case twice, an unknown
    case, or (k-fold) a patient in two validation folds. Empty list = sound. The builder refuses to
    write a version with violations; tests use it as the oracle."""
    problems = []
    for name, parts in splits.items():
        seen_case: set[str] = set()
        part_of_patient: dict[str, str] = {}
        for part, case_ids in parts.items():
            for case_id in case_ids:
                if case_id not in case_patient:
                    problems.append(f"{name}: unknown case {case_id}")
                    continue
                if case_id in seen_case:
                    problems.append(f"{name}: case {case_id} in two parts")
                seen_case.add(case_id)
                patient = case_patient[case_id]
                if part_of_patient.setdefault(patient, part) != part:
                    problems.append(f"{name}: patient {patient} in {part_of_patient[patient]} and {part}")
    fold_val_patient: dict[str, str] = {}
    for name, parts in splits.items():
        if name.startswith("fold-"):
            for case_id in parts.get("val", []):
                fold_patient = case_patient.get(case_id)
                if fold_patient is not None and fold_val_patient.setdefault(fold_patient, name) != name:
                    problems.append(f"patient {fold_patient} validates in {fold_val_patient[fold_patient]} and {name}")
    return problems
