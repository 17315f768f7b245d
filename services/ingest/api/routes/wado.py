"""WADO-RS: retrieve instances (multipart/related application/dicom) and metadata (DICOM JSON).

Instances stream from object storage part by part; the metadata comes from the catalogue."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import select

from services.ingest.api.deps import ContextDep, QueryCaller, SessionDep
from services.ingest.dicomweb import multipart_stream
from services.ingest.models import Instance, Series, Study
from services.ingest.query import instance_json
from shared.validation import DicomUID

router = APIRouter(prefix="/dicomweb", tags=["DICOMweb WADO-RS"])

_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "nothing stored under that UID"}}
INSTANCES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the instances, one application/dicom part each",
        "content": {'multipart/related; type="application/dicom"': {"schema": {"type": "string", "format": "binary"}}},
    },
    **_NOT_FOUND,
}
METADATA: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "DICOM JSON metadata of the instances",
        "content": {"application/dicom+json": {"schema": {"type": "array", "items": {"type": "object"}}}},
    },
    **_NOT_FOUND,
}


def _instances(
    session: SessionDep,
    ctx: ContextDep,
    study_uid: DicomUID,
    series_uid: str | None = None,
    sop_uid: str | None = None,
) -> list[Instance]:
    def either(uid: str) -> list[str]:
        return [uid, ctx.deidentifier.pseudonymise_uid(uid)]

    statement = (
        select(Instance)
        .join(Series, Instance.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
        .where(Study.study_instance_uid.in_(either(study_uid)), Instance.state == "stored")
    )
    if series_uid:
        statement = statement.where(Series.series_instance_uid.in_(either(series_uid)))
    if sop_uid:
        statement = statement.where(Instance.sop_instance_uid.in_(either(sop_uid)))
    instances = list(session.scalars(statement.order_by(Series.id, Instance.instance_number, Instance.id)))
    if not instances:
        target = sop_uid or series_uid or study_uid
        raise HTTPException(404, f"nothing stored under {target}")
    return instances


def _retrieve(ctx: ContextDep, instances: list[Instance]) -> StreamingResponse:
    keys = [instance.object_key for instance in instances]
    media_type, body = multipart_stream(ctx.store.iter_chunks(key) for key in keys)
    return StreamingResponse(body, media_type=media_type)


def _metadata(ctx: ContextDep, instances: list[Instance]) -> JSONResponse:
    base = ctx.settings.public_url.rstrip("/")
    return JSONResponse(
        [instance_json(instance, base, {"all"}) for instance in instances],
        media_type="application/dicom+json",
    )


@router.get("/studies/{study_uid}", summary="Retrieve a study", responses=INSTANCES, response_class=StreamingResponse)
def retrieve_study(study_uid: DicomUID, ctx: ContextDep, session: SessionDep, caller: QueryCaller) -> StreamingResponse:
    return _retrieve(ctx, _instances(session, ctx, study_uid))


@router.get(
    "/studies/{study_uid}/series/{series_uid}",
    summary="Retrieve a series",
    responses=INSTANCES,
    response_class=StreamingResponse,
)
def retrieve_series(
    study_uid: DicomUID, series_uid: DicomUID, ctx: ContextDep, session: SessionDep, caller: QueryCaller
) -> StreamingResponse:
    return _retrieve(ctx, _instances(session, ctx, study_uid, series_uid))


@router.get(
    "/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}",
    summary="Retrieve an instance",
    responses=INSTANCES,
    response_class=StreamingResponse,
)
def retrieve_instance(
    study_uid: DicomUID,
    series_uid: DicomUID,
    sop_uid: DicomUID,
    ctx: ContextDep,
    session: SessionDep,
    caller: QueryCaller,
) -> StreamingResponse:
    return _retrieve(ctx, _instances(session, ctx, study_uid, series_uid, sop_uid))


@router.get("/studies/{study_uid}/metadata", summary="Study metadata", responses=METADATA, response_class=JSONResponse)
def study_metadata(study_uid: DicomUID, ctx: ContextDep, session: SessionDep, caller: QueryCaller) -> JSONResponse:
    return _metadata(ctx, _instances(session, ctx, study_uid))


@router.get(
    "/studies/{study_uid}/series/{series_uid}/metadata",
    summary="Series metadata",
    responses=METADATA,
    response_class=JSONResponse,
)
def series_metadata(
    study_uid: DicomUID, series_uid: DicomUID, ctx: ContextDep, session: SessionDep, caller: QueryCaller
) -> JSONResponse:
    return _metadata(ctx, _instances(session, ctx, study_uid, series_uid))


@router.get(
    "/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/metadata",
    summary="Instance metadata",
    responses=METADATA,
    response_class=JSONResponse,
)
def instance_metadata(
    study_uid: DicomUID,
    series_uid: DicomUID,
    sop_uid: DicomUID,
    ctx: ContextDep,
    session: SessionDep,
    caller: QueryCaller,
) -> JSONResponse:
    return _metadata(ctx, _instances(session, ctx, study_uid, series_uid, sop_uid))
