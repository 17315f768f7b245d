"""Catalogue views beyond DICOMweb: series reconstruction state and the re-identification map."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel
from sqlalchemy import or_, select

from services.ingest.api.deps import AdminCaller, ContextDep, QueryCaller, SessionDep
from services.ingest.models import ReidentificationEntry, Series
from shared.validation import DicomUID, SafeText

router = APIRouter(tags=["catalogue"])


class SeriesStatus(BaseModel):
    series_instance_uid: str
    study_instance_uid: str
    modality: str | None
    site: str
    status: str
    instance_count: int
    non_volumetric_reason: str | None
    volumes: list[dict[str, Any]]


@router.get("/series/{series_uid}", response_model=SeriesStatus, summary="Reconstruction state of a series")
def series_status(series_uid: DicomUID, ctx: ContextDep, session: SessionDep, caller: QueryCaller) -> SeriesStatus:
    candidates = [series_uid, ctx.deidentifier.pseudonymise_uid(series_uid)]
    series = session.scalar(select(Series).where(Series.series_instance_uid.in_(candidates)))
    if series is None:
        raise HTTPException(404, f"no series {series_uid}")
    return SeriesStatus(
        series_instance_uid=series.series_instance_uid,
        study_instance_uid=series.study.study_instance_uid,
        modality=series.modality,
        site=series.site,
        status=series.status,
        instance_count=len(series.instances),
        non_volumetric_reason=series.non_volumetric_reason,
        volumes=series.volumes,
    )


class ReidentificationOut(BaseModel):
    kind: str
    pseudonym: str
    original: str
    date_offset_days: int | None


@router.get(
    "/admin/reidentification",
    response_model=list[ReidentificationOut],
    summary="Re-identify a pseudonym (admin only, audited)",
    responses={404: {"description": "the value is not in the re-identification map"}},
)
def reidentify(
    value: Annotated[SafeText, Query(min_length=1)], session: SessionDep, caller: AdminCaller
) -> list[ReidentificationEntry]:
    """Look up a pseudonymised UID or patient pseudonym (or the reverse: an original value)."""
    rows = list(
        session.scalars(
            select(ReidentificationEntry).where(
                or_(ReidentificationEntry.pseudonym == value, ReidentificationEntry.original == value)
            )
        )
    )
    if not rows:
        raise HTTPException(404, f"{value} is not in the re-identification map")
    return rows
