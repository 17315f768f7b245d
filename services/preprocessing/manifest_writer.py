"""Turn selected cases + a build request into a saved :class:`shared.datasets.DatasetManifest`.

QC-excluded cases are left out of ``cases`` and the splits and listed in ``qc.excluded`` with their
reasons (the manifest refuses a case that is both included and excluded).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.preprocessing.models import Case
from services.preprocessing.quality import build_qc_report, check_case_files
from shared.datasets import CaseRecord, DatasetManifest, manifest_key, save_manifest
from shared.preprocessing import load_spec
from shared.storage import ObjectStore


@dataclass
class WrittenVersion:
    version_id: str
    manifest_key: str
    spec_name: str
    preprocessing_hash: str
    labels: dict[int, str]
    site_of: dict[str, str]
    splits: dict[str, dict[str, list[str]]]
    excluded: dict[str, list[str]] = field(default_factory=dict)
    qc_report: dict[str, Any] = field(default_factory=dict)


def quality_control(
    cases: Sequence[Case], store: ObjectStore, say: Callable[[str], None] = lambda _: None
) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Exclusions ``{case_id: [reason]}`` and the QC report stored with the version.

    Each case's stored files are checked (geometry in world coordinates, label values against the
    collection's label names, NaN/Inf, intensity range, spacing outliers across the set); a case with an
    error-level finding is excluded with its reasons, never silently dropped.
    """
    allowed = set(labels_of(cases)) or None
    results = []
    with tempfile.TemporaryDirectory(prefix="vf-qc-") as workdir:
        for index, case in enumerate(cases, 1):
            image_path = Path(workdir) / "image.nii.gz"
            store.download_file(case.image_key, str(image_path))
            label_path = None
            if case.label_key:
                label_path = Path(workdir) / "label.nii.gz"
                store.download_file(case.label_key, str(label_path))
            results.append(
                check_case_files(case.case_id, image_path, label_path, modality=case.modality, allowed_labels=allowed)
            )
            if index % 50 == 0 or index == len(cases):
                say(f"QC {index}/{len(cases)} cases")
    report = build_qc_report(results)
    return report.excluded, report.to_dict()


def labels_of(cases: Sequence[Case]) -> dict[int, str]:
    names: dict[int, str] = {}
    for case in cases:
        names.update({int(k): str(v) for k, v in case.stats.get("label_names", {}).items()})
    return dict(sorted(names.items()))


def write_manifest(
    store: ObjectStore, cases: Sequence[Case], request: Any, spec_name: str, say: Callable[[str], None]
) -> WrittenVersion:
    from services.preprocessing.dataset_builder import plan_sites_and_splits

    spec = load_spec(spec_name)
    excluded, report = quality_control(cases, store, say) if request.qc else ({}, {"status": "disabled"})
    if excluded:
        say(f"QC excluded {len(excluded)} case(s)")
    site_of, splits = plan_sites_and_splits(cases, request, excluded=list(excluded))
    records = [
        CaseRecord(
            case_id=c.case_id,
            patient=c.patient,
            site=site_of[c.case_id],
            modality=c.modality,
            image_key=c.image_key,
            label_key=c.label_key,
            image_sha256=c.image_sha256,
            label_sha256=c.label_sha256,
            case_hash=c.case_hash,
            source=c.source,
        )
        for c in cases
        if c.case_id not in excluded
    ]
    labels = labels_of(cases)
    manifest = DatasetManifest.create(request.name, records, splits, spec, labels=labels, excluded=excluded)
    saved = save_manifest(store, manifest)
    return WrittenVersion(
        version_id=saved.version_id,
        manifest_key=manifest_key(saved.version_id),
        spec_name=spec.name,
        preprocessing_hash=spec.hash,
        labels=labels,
        site_of=site_of,
        splits=splits,
        excluded=excluded,
        qc_report=report,
    )
