"""Dataset versions: request a build, follow it, list and inspect versions, their splits, QC report and
training plan, and request the precomputation of their preprocessed cases."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request, status
from pydantic import BaseModel, Field
from sqlalchemy import select

from services.preprocessing.api.deps import BuildCaller, ContextDep, ReadCaller, SessionDep
from services.preprocessing.dataset_builder import BuildRequest
from services.preprocessing.models import Case, DatasetBuild, DatasetVersion, PrecomputeJob
from services.preprocessing.sites import SiteAssignmentError, parse_site_manifest
from shared.contracts.tasks import BUILD_DATASET_TASK, PRECOMPUTE_TASK
from shared.http import add_audit_uids
from shared.validation import ResourceId, SafeText

router = APIRouter(tags=["datasets"])


class BuildOut(BaseModel):
    id: str
    name: str
    status: str
    version_id: str | None
    error: str | None
    request: dict[str, Any]
    requested_by: str | None
    created_at: dt.datetime
    finished_at: dt.datetime | None


class VersionOut(BaseModel):
    version_id: str
    name: str
    manifest_key: str
    spec_name: str
    preprocessing_hash: str
    case_count: int
    excluded_count: int
    labels: dict[str, str]
    site_counts: dict[str, int]
    split_names: list[str]
    build_config: dict[str, Any]
    created_by: str | None
    created_at: dt.datetime


class PrecomputeRequest(BaseModel):
    case_ids: list[SafeText] = Field(default_factory=list, description="Empty = every case of the version.")


class PrecomputeOut(BaseModel):
    id: str
    version_id: str
    pipeline_hash: str
    status: str
    total: int
    computed: int
    cached: int
    failed: int
    errors: dict[str, str]
    created_at: dt.datetime
    finished_at: dt.datetime | None


def _version(session: Any, version_id: ResourceId) -> DatasetVersion:
    version = session.get(DatasetVersion, version_id)
    if version is None:
        raise HTTPException(404, f"no dataset version {version_id}")
    return version


@router.post(
    "/datasets",
    response_model=BuildOut,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Build a dataset version from candidate cases (asynchronous; follow /datasets/builds/{id})",
    responses={
        404: {"description": "the collection has no cases"},
        422: {"description": "an invalid request, or a site manifest that gives a case two sites"},
    },
)
def create_dataset(
    body: BuildRequest, request: Request, ctx: ContextDep, session: SessionDep, caller: BuildCaller
) -> DatasetBuild:
    # Refuse what can be checked now, so a bad request is a 422 here rather than a failed build later.
    if body.sites.strategy == "manifest" and not body.sites.manifest_csv:
        raise HTTPException(422, "site strategy 'manifest' needs sites.manifest_csv")
    if body.sites.manifest_csv:
        try:
            parse_site_manifest(body.sites.manifest_csv)
        except SiteAssignmentError as exc:
            raise HTTPException(422, str(exc)) from exc
    if (
        body.collection is not None
        and session.scalar(select(Case.id).where(Case.collection == body.collection)) is None
    ):
        raise HTTPException(404, f"no cases in collection {body.collection!r}")
    build = DatasetBuild(
        id=str(uuid.uuid4()),
        name=body.name,
        request=body.model_dump(mode="json"),
        requested_by=caller.name,
    )
    session.add(build)
    session.commit()
    ctx.send(BUILD_DATASET_TASK, [build.id], task_id=f"build-{build.id}")
    add_audit_uids(request, build.id)
    return build


@router.get("/datasets/builds/{id}", response_model=BuildOut, summary="State of a dataset build")
def get_build(id: ResourceId, session: SessionDep, caller: ReadCaller) -> DatasetBuild:
    build = session.get(DatasetBuild, id)
    if build is None:
        raise HTTPException(404, f"no dataset build {id}")
    return build


@router.get("/datasets", response_model=list[VersionOut], summary="Dataset versions, newest first")
def list_versions(session: SessionDep, caller: ReadCaller, name: SafeText | None = None) -> list[DatasetVersion]:
    query = select(DatasetVersion).order_by(DatasetVersion.created_at.desc())
    if name is not None:
        query = query.where(DatasetVersion.name == name)
    return list(session.scalars(query))


@router.get("/datasets/{version_id}", response_model=VersionOut, summary="One dataset version")
def get_version(version_id: ResourceId, request: Request, session: SessionDep, caller: ReadCaller) -> DatasetVersion:
    add_audit_uids(request, version_id)
    return _version(session, version_id)


@router.get("/datasets/{version_id}/manifest", summary="The full manifest (shared.datasets.DatasetManifest JSON)")
def get_manifest(
    version_id: ResourceId, request: Request, ctx: ContextDep, session: SessionDep, caller: ReadCaller
) -> Any:
    from fastapi.responses import Response

    add_audit_uids(request, version_id)
    version = _version(session, version_id)
    return Response(ctx.store.get_bytes(version.manifest_key), media_type="application/json")


@router.get("/datasets/{version_id}/splits", summary="Every split: {name: {train|val|test: [case_id]}}")
def get_splits(
    version_id: ResourceId, request: Request, ctx: ContextDep, session: SessionDep, caller: ReadCaller
) -> dict[str, dict[str, list[str]]]:
    from shared.datasets import load_manifest

    add_audit_uids(request, version_id)
    _version(session, version_id)
    return {
        name: {str(part): ids for part, ids in parts.items()}
        for name, parts in load_manifest(ctx.store, version_id).splits.items()
    }


@router.get("/datasets/{version_id}/qc", summary="QC report and the cases QC excluded, with reasons")
def get_qc(version_id: ResourceId, request: Request, ctx: ContextDep, session: SessionDep, caller: ReadCaller) -> Any:
    from shared.datasets import load_manifest

    add_audit_uids(request, version_id)
    version = _version(session, version_id)
    manifest = load_manifest(ctx.store, version_id)
    return {"version_id": version_id, "excluded": manifest.qc.get("excluded", {}), "report": version.qc_report}


class PlanOut(BaseModel):
    version_id: str
    config: dict[str, Any] = Field(
        description="The TrainingConfig fields the plan fills where a config leaves them unset (as YAML nests them)."
    )
    plan: dict[str, Any] = Field(description="The whole shared.training.plans.TrainingPlan.")
    fingerprint_key: str


@router.get(
    "/datasets/{version_id}/plan",
    response_model=PlanOut,
    summary="The nnU-Net-style training plan derived from the version's stored fingerprint",
    responses={404: {"description": "no such version, or it has no fingerprint (no labelled cases)"}},
)
def get_plan(
    version_id: ResourceId,
    request: Request,
    ctx: ContextDep,
    session: SessionDep,
    caller: ReadCaller,
    memory_budget_gib: float = Query(default=8.0, gt=0, le=1024, description="Activation memory per step."),
) -> PlanOut:
    # planned here, not stored: the rules may improve, the fingerprint (the version's facts) does not change
    from shared.contracts.layout import fingerprint_key
    from shared.datasets.fingerprint import load_version_fingerprint
    from shared.training.plans import plan_from_fingerprint

    add_audit_uids(request, version_id)
    _version(session, version_id)
    fingerprint = load_version_fingerprint(ctx.store, version_id)
    if fingerprint is None:
        raise HTTPException(
            404,
            f"dataset version {version_id} has no fingerprint: it has no labelled cases, or it was built before "
            "fingerprints were stored (POST the same build request again to add it)",
        )
    plan = plan_from_fingerprint(fingerprint, memory_budget_gib=memory_budget_gib)
    return PlanOut(
        version_id=version_id,
        config=plan.config_values(),
        plan=plan.model_dump(mode="json"),
        fingerprint_key=fingerprint_key(version_id),
    )


@router.post(
    "/datasets/{version_id}/precompute",
    response_model=PrecomputeOut,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Preprocess the version's cases into the shared cache (cached cases cost nothing)",
)
def precompute(
    version_id: ResourceId,
    body: PrecomputeRequest,
    request: Request,
    ctx: ContextDep,
    session: SessionDep,
    caller: BuildCaller,
) -> PrecomputeJob:
    version = _version(session, version_id)
    job = PrecomputeJob(
        id=str(uuid.uuid4()),
        version_id=version_id,
        pipeline_hash=version.preprocessing_hash,
        case_ids=body.case_ids,
        requested_by=caller.name,
    )
    session.add(job)
    session.commit()
    ctx.send(PRECOMPUTE_TASK, [job.id], task_id=f"precompute-{job.id}")  # the task reads the job's row
    add_audit_uids(request, version_id, job.id)
    return job


@router.get("/precompute/{id}", response_model=PrecomputeOut, summary="State of a precompute job")
def get_precompute(id: ResourceId, session: SessionDep, caller: ReadCaller) -> PrecomputeJob:
    job = session.get(PrecomputeJob, id)
    if job is None:
        raise HTTPException(404, f"no precompute job {id}")
    return job
