"""Build an immutable dataset version: cases + site assignment + splits + preprocessing spec + QC →
``datasets/{version_id}/manifest.json`` (via :mod:`shared.datasets`), its fingerprint
(``datasets/{version_id}/fingerprint.json``, what a training plan is derived from) and its index rows in
the database.

The version ID is a content hash (docs/contracts.md), so building the same request over the same cases
twice yields the same version: a redelivered build task finds its version and only marks the build done.
This module orchestrates; the decisions live in the pure functions of :mod:`.sites` and :mod:`.splits`
and in the QC functions of :mod:`.quality`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from services.preprocessing import metrics
from services.preprocessing.case_pool import select_cases
from services.preprocessing.models import Case, DatasetBuild, DatasetVersion, DatasetVersionCase
from services.preprocessing.sites import assign_sites, parse_site_manifest
from services.preprocessing.splits import SplitCase, make_splits, split_violations
from shared.contracts.layout import fingerprint_key
from shared.db.base import session_scope, utcnow
from shared.storage import ObjectStore
from shared.validation import SAFE_TEXT_PATTERN, SafeText

log = logging.getLogger("voxelflow.preprocessing.builder")


class BuildError(ValueError):
    """The request cannot produce a dataset version (no cases, unsatisfiable sites or splits)."""


# A manifest: the header 'case_id,site' or 'patient,site', then one 'key,site' row per case or patient. Keys
# are case ids or patients as the API names them, sites are queue-safe names (federated training uses them).
SITE_MANIFEST_PATTERN = (
    r"^(case_id|patient),site(\r?\n[A-Za-z0-9][A-Za-z0-9._-]{0,127},[a-z0-9][a-z0-9-]{0,62})+(\r?\n)?$"
)


class SiteOptions(BaseModel):
    # For the OpenAPI document: the manifest strategy needs its manifest (the route refuses it without one).
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"properties": {"strategy": {"enum": ["iid", "intensity", "size", "source"]}}},
                {"required": ["manifest_csv"], "properties": {"manifest_csv": {"type": "string"}}},
            ]
        }
    )

    strategy: Literal["iid", "intensity", "size", "manifest", "source"] = Field(
        default="iid", description="How cases get sites (services/preprocessing/sites.py)."
    )
    n_sites: int = Field(default=1, ge=1, le=256)
    seed: int = 0
    heterogeneity: float = Field(default=1.0, ge=0.0, le=1.0, description="1 = pure quantile blocks, 0 = IID.")
    manifest_csv: str | None = Field(
        default=None,
        max_length=10_000_000,
        pattern=SITE_MANIFEST_PATTERN,
        description="'case_id,site' or 'patient,site' CSV text: that header, then one row per case or patient "
        "(a key given two sites is refused).",
    )


class SplitOptions(BaseModel):
    val_fraction: float = Field(default=0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(default=0.15, ge=0.0, lt=1.0)
    k_folds: int = Field(default=5, ge=0, le=20, description="0 or 1 = no k-fold splits.")
    seed: int = 0
    leave_one_site_out: bool = True


class BuildRequest(BaseModel):
    name: str = Field(min_length=1, max_length=200, pattern=SAFE_TEXT_PATTERN)
    collection: SafeText | None = Field(
        default=None, description="Cases of this collection (MSD import name, catalogue)."
    )
    case_ids: list[SafeText] | None = Field(default=None, description="Only these case ids (within the collection).")
    include_unlabelled: bool = False
    spec: SafeText | None = Field(
        default=None, description="Preprocessing spec name or YAML path; default from settings."
    )
    sites: SiteOptions = Field(default_factory=SiteOptions)
    splits: SplitOptions = Field(default_factory=SplitOptions)
    qc: bool = Field(default=True, description="Run quality control and exclude failing cases from the splits.")


def site_value(case: Case, strategy: str) -> float:
    """What non-IID assignment sorts by: raw mean intensity, or the image's physical volume."""
    return float(case.stats["intensity_mean" if strategy == "intensity" else "volume_mm3"])


def plan_sites_and_splits(
    cases: Sequence[Case], request: BuildRequest, excluded: Sequence[str] = ()
) -> tuple[dict[str, str], dict[str, dict[str, list[str]]]]:
    """Pure planning: case → site for every case, and splits over the cases QC did not exclude."""
    case_patient = {c.case_id: c.patient for c in cases}
    if len(case_patient) != len(cases):
        raise BuildError("case ids collide across the selected collections; select one collection")
    options = request.sites
    site_of = assign_sites(
        case_patient,
        options.strategy,
        n_sites=options.n_sites,
        seed=options.seed,
        heterogeneity=options.heterogeneity,
        case_values={c.case_id: site_value(c, options.strategy) for c in cases}
        if options.strategy in ("intensity", "size")
        else None,
        case_source_site={c.case_id: c.site for c in cases},
        manifest=parse_site_manifest(options.manifest_csv) if options.manifest_csv else None,
    )
    skip = set(excluded)
    split_cases = [
        SplitCase(
            c.case_id,
            c.patient,
            site_of[c.case_id],
            "+".join(str(v) for v in c.stats.get("labels_present", [])) if c.label_key else None,
        )
        for c in cases
        if c.case_id not in skip
    ]
    s = request.splits
    splits = make_splits(split_cases, s.val_fraction, s.test_fraction, s.k_folds, s.seed, s.leave_one_site_out)
    problems = split_violations(splits, case_patient)
    if problems:  # cannot happen by construction; refusing is cheaper than a leaked test set
        raise BuildError("split check failed: " + "; ".join(problems[:5]))
    return site_of, splits


def build_version(
    store: ObjectStore,
    session_factory: sessionmaker[Session],
    build_id: str,
    default_spec: str,
    progress: Callable[[str], None] | None = None,
) -> str:
    """Run one build to completion; returns the version ID. Idempotent (see module doc)."""
    from services.preprocessing.manifest_writer import write_manifest

    say = progress or (lambda message: log.info(message))
    with session_scope(session_factory) as session:
        build = session.get(DatasetBuild, build_id)
        if build is None:
            raise BuildError(f"no dataset build {build_id}")
        if build.status == "done" and build.version_id:
            return build.version_id
        build.status = "running"
        request = BuildRequest.model_validate(build.request)
        requested_by = build.requested_by
    try:
        with session_scope(session_factory) as session:
            cases = select_cases(session, request.collection, request.case_ids, not request.include_unlabelled)
            session.expunge_all()
        if not cases:
            raise BuildError(f"no {'' if request.include_unlabelled else 'labelled '}cases match {request.collection=}")
        if request.case_ids:
            missing = sorted(set(request.case_ids) - {c.case_id for c in cases})
            if missing:
                raise BuildError(f"{len(missing)} requested case(s) not found or unlabelled: {missing[:10]}")
        say(f"building {request.name!r} from {len(cases)} cases")
        written = write_manifest(store, cases, request, request.spec or default_spec, say)
        write_fingerprint(
            store,
            written.version_id,
            request.name,
            [c for c in cases if c.case_id not in written.excluded],
            written.labels,
            say,
        )
        _record_version(session_factory, written, cases, request, requested_by)
    except Exception as exc:
        with session_scope(session_factory) as session:
            build = session.get(DatasetBuild, build_id)
            if build is not None:
                build.status, build.error, build.finished_at = "failed", f"{type(exc).__name__}: {exc}", utcnow()
        metrics.dataset_versions_total.labels("failed").inc()
        raise
    with session_scope(session_factory) as session:
        build = session.get(DatasetBuild, build_id)
        assert build is not None
        build.status, build.version_id, build.error, build.finished_at = "done", written.version_id, None, utcnow()
    metrics.dataset_versions_total.labels("built").inc()
    metrics.qc_excluded_total.inc(len(written.excluded))
    say(f"dataset version {written.version_id}: {len(cases)} cases, {len(written.excluded)} excluded by QC")
    return written.version_id


def write_fingerprint(
    store: ObjectStore,
    version_id: str,
    name: str,
    cases: Sequence[Case],
    labels: dict[int, str],
    say: Callable[[str], None] = lambda _: None,
) -> str | None:
    """Store the version's fingerprint over its labelled, QC-passed cases, unless it is already there: the
    version is content-addressed, so an existing fingerprint is this one (a redelivered or repeated build
    reads no case twice). Returns its key, or None for a version without labelled cases (no plan then).

    Also how a version built before fingerprints were stored gets one: the same build request again."""
    from shared.datasets.fingerprint import fingerprint_stored_cases, save_version_fingerprint

    key = fingerprint_key(version_id)
    if store.exists(key):
        return key
    modalities = sorted({c.modality for c in cases if c.label_key})
    fingerprint = fingerprint_stored_cases(
        store,
        [(c.image_key, c.label_key) for c in cases],
        name=name,
        modality="+".join(modalities) or "OT",
        labels=labels or {0: "background"},
    )
    if fingerprint is None:
        say(f"{version_id} has no labelled cases: no fingerprint")
        return None
    say(f"fingerprint of {fingerprint.case_count} labelled cases written")
    return save_version_fingerprint(store, version_id, fingerprint)


def _record_version(
    session_factory: sessionmaker[Session],
    written: Any,
    cases: Sequence[Case],
    request: BuildRequest,
    requested_by: str | None,
) -> None:
    """Index rows of the version; skipped when the same content-addressed version already exists."""
    with session_scope(session_factory) as session:
        if session.scalar(select(DatasetVersion).where(DatasetVersion.version_id == written.version_id)):
            return
        site_counts: dict[str, int] = {}
        for site in written.site_of.values():
            site_counts[site] = site_counts.get(site, 0) + 1
        session.add(
            DatasetVersion(
                version_id=written.version_id,
                name=request.name,
                manifest_key=written.manifest_key,
                spec_name=written.spec_name,
                preprocessing_hash=written.preprocessing_hash,
                case_count=len(cases),
                excluded_count=len(written.excluded),
                labels={str(k): v for k, v in written.labels.items()},
                site_counts=dict(sorted(site_counts.items())),
                split_names=sorted(written.splits),
                qc_report=written.qc_report,
                build_config=request.model_dump(mode="json"),
                created_by=requested_by,
            )
        )
        session.flush()
        session.add_all(
            DatasetVersionCase(
                version_id=written.version_id,
                case_id=c.case_id,
                case_hash=c.case_hash,
                patient=c.patient,
                site=written.site_of[c.case_id],
                excluded=c.case_id in written.excluded,
            )
            for c in cases
        )
