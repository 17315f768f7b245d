"""QIDO-RS: search studies, series and instances (PS3.18 10.6)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import select

from services.ingest.api.deps import ContextDep, QueryCaller, SessionDep
from services.ingest.models import Series, Study
from services.ingest.query import (
    QueryError,
    build_select,
    instance_json,
    parse_query,
    series_json,
    study_json,
)
from shared.auth import ORIGINAL_IDENTIFIER_ROLES, Principal
from shared.validation import DicomUID

router = APIRouter(prefix="/dicomweb", tags=["DICOMweb QIDO-RS"])

SEARCH: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the matches, as DICOM JSON",
        "content": {"application/dicom+json": {"schema": {"type": "array", "items": {"type": "object"}}}},
    },
    204: {"description": "no matches"},
    400: {"description": "unknown matching key or malformed value"},
    404: {"description": "no such study or series"},
}


def _search(
    request: Request, ctx: ContextDep, session: SessionDep, caller: Principal, level: str, scope: dict[str, str]
) -> Response:
    params = [(k, v) for k, v in request.query_params.multi_items()]
    params += list(scope.items())
    try:
        query = parse_query(level, params)
    except QueryError as exc:
        raise HTTPException(400, str(exc)) from exc

    translate_patients = caller.role in ORIGINAL_IDENTIFIER_ROLES

    def translate(kind: str, original: str) -> str | None:
        if kind == "patient":
            # only roles that may know the original: a researcher's PatientID matches stored pseudonyms only
            return ctx.deidentifier.pseudonymise_patient_id(original) if translate_patients else None
        return ctx.deidentifier.pseudonymise_uid(original)

    base = ctx.settings.public_url.rstrip("/")
    rows = session.scalars(build_select(query, translate)).all()
    results: list[dict[str, Any]]
    if level == "study":
        results = [study_json(session, row, base, query.includefields) for row in rows]
    elif level == "series":
        results = [series_json(session, row, base, query.includefields) for row in rows]
    else:
        results = [instance_json(row, base, query.includefields) for row in rows]
    if not results:
        return Response(status_code=204)  # PS3.18: no matches
    return JSONResponse(results, media_type="application/dicom+json")


def _require_study(session: SessionDep, ctx: ContextDep, study_uid: DicomUID) -> None:
    candidates = [study_uid, ctx.deidentifier.pseudonymise_uid(study_uid)]
    if session.scalar(select(Study.id).where(Study.study_instance_uid.in_(candidates))) is None:
        raise HTTPException(404, f"no study {study_uid}")


@router.get("/studies", summary="Search for studies", responses=SEARCH, response_class=JSONResponse)
def search_studies(request: Request, ctx: ContextDep, session: SessionDep, caller: QueryCaller) -> Response:
    return _search(request, ctx, session, caller, "study", {})


@router.get("/series", summary="Search for series", responses=SEARCH, response_class=JSONResponse)
def search_all_series(request: Request, ctx: ContextDep, session: SessionDep, caller: QueryCaller) -> Response:
    return _search(request, ctx, session, caller, "series", {})


@router.get(
    "/studies/{study_uid}/series", summary="Search for series of a study", responses=SEARCH, response_class=JSONResponse
)
def search_series(
    study_uid: DicomUID, request: Request, ctx: ContextDep, session: SessionDep, caller: QueryCaller
) -> Response:
    _require_study(session, ctx, study_uid)
    return _search(request, ctx, session, caller, "series", {"StudyInstanceUID": study_uid})


@router.get(
    "/studies/{study_uid}/series/{series_uid}/instances",
    summary="Search for instances of a series",
    responses=SEARCH,
    response_class=JSONResponse,
)
def search_instances(
    study_uid: DicomUID,
    series_uid: DicomUID,
    request: Request,
    ctx: ContextDep,
    session: SessionDep,
    caller: QueryCaller,
) -> Response:
    _require_study(session, ctx, study_uid)
    candidates = [series_uid, ctx.deidentifier.pseudonymise_uid(series_uid)]
    if session.scalar(select(Series.id).where(Series.series_instance_uid.in_(candidates))) is None:
        raise HTTPException(404, f"no series {series_uid}")
    return _search(
        request, ctx, session, caller, "instance", {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid}
    )


@router.get(
    "/studies/{study_uid}/instances",
    summary="Search for instances of a study",
    responses=SEARCH,
    response_class=JSONResponse,
)
def search_study_instances(
    study_uid: DicomUID, request: Request, ctx: ContextDep, session: SessionDep, caller: QueryCaller
) -> Response:
    _require_study(session, ctx, study_uid)
    return _search(request, ctx, session, caller, "instance", {"StudyInstanceUID": study_uid})
