"""Which site each case belongs to, for federated simulation (pure functions, no I/O).

Assignment is per **patient**: all cases of a patient go to one site, so a patient never appears at two
sites and leave-one-site-out stays patient-level. Every function is deterministic for a given seed
(inputs are sorted first, so the caller's order does not matter).

- ``iid``: patients shuffled with the seed and dealt round-robin: sites differ by at most one patient.
- ``intensity`` / ``size`` (non-IID): patients sorted by a per-patient value (mean raw intensity, image
  volume in mm³) and cut into N equal-count quantile blocks, so site k holds the k-th quantile. The
  ``heterogeneity`` h in [0, 1] blends the value rank with a seeded random rank (key = h·value_rank +
  (1-h)·random_rank): 1 = pure quantile blocks, 0 = IID; values in between let site heterogeneity be
  studied as a dial.
- ``manifest``: a CSV ``case_id,site`` (or ``patient,site``) fixes the assignment.
- ``source``: keep the site a case was received at (catalogue cases carry ingest's site).
"""

from __future__ import annotations

import csv
import io
import random
import statistics
from collections.abc import Mapping, Sequence

STRATEGIES = ("iid", "intensity", "size", "manifest", "source")


class SiteAssignmentError(ValueError):
    """The request cannot be satisfied (too few patients, incomplete manifest, unknown strategy)."""


def site_names(n_sites: int) -> list[str]:
    return [f"site-{i + 1}" for i in range(n_sites)]


def _check(patients: Sequence[str], n_sites: int) -> list[str]:
    if n_sites < 1:
        raise SiteAssignmentError(f"need at least one site, got {n_sites}")
    unique = sorted(set(patients))
    if len(unique) < n_sites:
        raise SiteAssignmentError(f"{len(unique)} patients cannot fill {n_sites} sites")
    return unique


def assign_iid(patients: Sequence[str], n_sites: int, seed: int) -> dict[str, str]:
    """Seeded shuffle, dealt round-robin: balanced sites with no relation to any patient property."""
    unique = _check(patients, n_sites)
    random.Random(seed).shuffle(unique)
    names = site_names(n_sites)
    return {patient: names[i % n_sites] for i, patient in enumerate(unique)}


def _ranks(values: Sequence[float]) -> list[float]:
    """Normalised ranks in [0, 1] (ties keep input order, which is sorted by patient)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    denominator = max(len(values) - 1, 1)
    for rank, index in enumerate(order):
        ranks[index] = rank / denominator
    return ranks


def assign_by_quantile(
    values: Mapping[str, float], n_sites: int, seed: int, heterogeneity: float = 1.0
) -> dict[str, str]:
    """Non-IID: site k gets the k-th quantile block of the blended value/random rank (see module doc)."""
    if not 0.0 <= heterogeneity <= 1.0:
        raise SiteAssignmentError(f"heterogeneity must be in [0, 1], got {heterogeneity}")
    patients = _check(list(values), n_sites)
    value_rank = _ranks([float(values[p]) for p in patients])
    rng = random.Random(seed)
    random_rank = _ranks([rng.random() for _ in patients])
    key = [heterogeneity * v + (1.0 - heterogeneity) * r for v, r in zip(value_rank, random_rank, strict=True)]
    order = sorted(range(len(patients)), key=lambda i: (key[i], random_rank[i]))
    names = site_names(n_sites)
    # equal-count blocks: position i of n goes to block floor(i * N / n)
    return {patients[index]: names[pos * n_sites // len(patients)] for pos, index in enumerate(order)}


def patient_values(case_values: Mapping[str, float], case_patient: Mapping[str, str]) -> dict[str, float]:
    """Per-patient value for quantile assignment: the median over the patient's cases."""
    grouped: dict[str, list[float]] = {}
    for case_id, value in case_values.items():
        grouped.setdefault(case_patient[case_id], []).append(float(value))
    return {patient: statistics.median(vals) for patient, vals in grouped.items()}


def parse_site_manifest(text: str) -> dict[str, str]:
    """``case_id,site`` or ``patient,site`` CSV (header required) → {key: site}; the key column is reported
    back as ``case_id:`` or ``patient:`` prefixed so the caller knows which it is."""
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip() for f in (reader.fieldnames or [])]
    if "site" not in fields or not ({"case_id", "patient"} & set(fields)):
        raise SiteAssignmentError(f"site manifest needs a header 'case_id,site' or 'patient,site', got {fields}")
    key_field = "case_id" if "case_id" in fields else "patient"
    mapping: dict[str, str] = {}
    for line, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        key, site = row.get(key_field, ""), row.get("site", "")
        if not key or not site:
            raise SiteAssignmentError(f"site manifest line {line}: empty {key_field} or site")
        if mapping.get(f"{key_field}:{key}", site) != site:
            raise SiteAssignmentError(f"site manifest line {line}: {key_field} {key} given two sites")
        mapping[f"{key_field}:{key}"] = site
    if not mapping:
        raise SiteAssignmentError("site manifest has no rows")
    return mapping


def assign_from_manifest(mapping: Mapping[str, str], case_patient: Mapping[str, str]) -> dict[str, str]:
    """Case → site from a parsed manifest (keys ``case_id:X`` or ``patient:Y``); every case must be covered."""
    result: dict[str, str] = {}
    missing = []
    for case_id, patient in sorted(case_patient.items()):
        site = mapping.get(f"case_id:{case_id}") or mapping.get(f"patient:{patient}")
        if site is None:
            missing.append(case_id)
        else:
            result[case_id] = site
    if missing:
        shown = ", ".join(missing[:10]) + (" …" if len(missing) > 10 else "")
        raise SiteAssignmentError(f"site manifest does not cover {len(missing)} case(s): {shown}")
    return result


def assign_sites(
    case_patient: Mapping[str, str],
    strategy: str,
    n_sites: int = 1,
    seed: int = 0,
    heterogeneity: float = 1.0,
    case_values: Mapping[str, float] | None = None,
    case_source_site: Mapping[str, str | None] | None = None,
    manifest: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Case → site by ``strategy`` (see module doc); the one entry point the dataset builder calls."""
    if strategy not in STRATEGIES:
        raise SiteAssignmentError(f"unknown site strategy {strategy!r}; one of {', '.join(STRATEGIES)}")
    if strategy == "manifest":
        if manifest is None:
            raise SiteAssignmentError("strategy 'manifest' needs a site manifest")
        return assign_from_manifest(manifest, case_patient)
    if strategy == "source":
        sources = case_source_site or {}
        unknown = sorted(c for c in case_patient if not sources.get(c))
        if unknown:
            raise SiteAssignmentError(
                f"strategy 'source': {len(unknown)} case(s) have no recorded site, e.g. {unknown[0]}"
            )
        return {c: str(sources[c]) for c in case_patient}
    if strategy == "iid":
        by_patient = assign_iid(list(case_patient.values()), n_sites, seed)
    else:
        if case_values is None or set(case_values) != set(case_patient):
            raise SiteAssignmentError(f"strategy {strategy!r} needs a value for every case")
        by_patient = assign_by_quantile(patient_values(case_values, case_patient), n_sites, seed, heterogeneity)
    return {case_id: by_patient[patient] for case_id, patient in case_patient.items()}
