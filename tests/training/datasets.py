"""Test data for the training tests: real hippocampus cases in the cached-case format of docs/contracts.md,
and a dataset version in the documented storage layout.

Until shared.datasets lands, cases are built here directly with MONAI (the same deterministic steps the
preprocessing spec applies: load, channel first, RAS, per-volume z-score over non-zero voxels, pad to 16).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.datasets import CaseRecord, DatasetManifest, preprocess_case, save_manifest, store_case_file
from shared.preprocessing import load_spec
from shared.training.msd import load_msd_cases as load_hippocampus_cases  # noqa: F401

SITE = "site-a"

# Small volumes first keeps every epoch cheap on a 2-core machine.
CASE_IDS = [
    "hippocampus_004",
    "hippocampus_006",
    "hippocampus_007",
    "hippocampus_017",
    "hippocampus_019",
    "hippocampus_026",
    "hippocampus_033",
    "hippocampus_034",
]


def write_dataset(store: Any, root: Path, case_ids: list[str]) -> str:
    """A real dataset version (shared.datasets) of the first five ids, preprocessed with mr_hippocampus:
    holdout.train = 3 cases of site-a + 1 of site-b, holdout.val = 1 case of site-a. Returns its version id."""
    sites = [SITE, SITE, SITE, SITE, "site-b"]
    spec = load_spec("mr_hippocampus")
    records = []
    for case_id, site in zip(case_ids[:5], sites, strict=True):
        image_key, image_sha = store_case_file(store, root / "imagesTr" / f"{case_id}.nii.gz")
        label_key, label_sha = store_case_file(store, root / "labelsTr" / f"{case_id}.nii.gz")
        records.append(
            CaseRecord(case_id=case_id, patient=case_id, site=site, modality="MR", image_key=image_key,
                       label_key=label_key, image_sha256=image_sha, label_sha256=label_sha, source=f"msd:{case_id}")
        )  # fmt: skip
    ids = [r.case_id for r in records]
    splits = {"holdout": {"train": [ids[0], ids[1], ids[2], ids[4]], "val": [ids[3]], "test": []}}
    manifest = DatasetManifest.create("test", records, splits, spec, labels={0: "bg", 1: "anterior", 2: "posterior"})
    save_manifest(store, manifest)
    for record in records:
        preprocess_case(store, record, spec)
    return manifest.version_id


def write_split_dataset(
    store: Any, root: Path, parts: dict[str, dict[str, list[str]]], name: str = "test-sites", loso: bool = False
) -> str:
    """A dataset version with ``parts[site][part] = [case ids]`` (part: train/val/test) as ``holdout``,
    preprocessed with mr_hippocampus into the cache (shared.datasets.preprocess_cases). ``loso``: also the
    ``loso-{site}`` splits the preprocessing service makes (its own ``leave_one_site_out``). Returns its id."""
    from shared.datasets import preprocess_cases

    spec = load_spec("mr_hippocampus")
    records: list[CaseRecord] = []
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for site, by_part in parts.items():
        for part, case_ids in by_part.items():
            for case_id in case_ids:
                image_key, image_sha = store_case_file(store, root / "imagesTr" / f"{case_id}.nii.gz")
                label_key, label_sha = store_case_file(store, root / "labelsTr" / f"{case_id}.nii.gz")
                records.append(
                    CaseRecord(case_id=case_id, patient=case_id, site=site, modality="MR", image_key=image_key,
                               label_key=label_key, image_sha256=image_sha, label_sha256=label_sha,
                               source=f"msd:{case_id}")
                )  # fmt: skip
                splits[part].append(case_id)
    all_splits: dict[str, dict[str, list[str]]] = {"holdout": splits}
    if loso:
        from services.preprocessing.splits import SplitCase, leave_one_site_out

        cases = [SplitCase(r.case_id, r.patient, r.site) for r in records]
        all_splits.update(leave_one_site_out(cases, splits))
    manifest = DatasetManifest.create(name, records, all_splits, spec, labels={0: "bg", 1: "anterior", 2: "posterior"})
    save_manifest(store, manifest)
    result = preprocess_cases(store, records, spec, workers=2)
    assert not result.failed, result.failed
    return manifest.version_id
