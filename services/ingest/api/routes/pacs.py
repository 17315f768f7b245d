"""Pull studies from a configured PACS (DICOMweb or DIMSE, by the URL scheme of its connection) as a
background job."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.ingest.api.deps import ContextDep, OperatorCaller, SessionDep
from services.ingest.models import PullJob
from services.ingest.pacs_pull import SERIES_KEYS, STUDY_KEYS, PullQueryError, split_query
from shared.contracts.tasks import INGEST_QUEUE, PULL_FROM_PACS_TASK
from shared.validation import DicomUID, ResourceId, SafeTextMap, exactly_one_of

router = APIRouter(prefix="/pacs", tags=["PACS"])


def _restrict_keys(schema: dict[str, Any]) -> None:
    for option in schema.get("anyOf", [schema]):
        if option.get("type") == "object":
            option["propertyNames"] = {**option.get("propertyNames", {}), **_matching_key_names()}


def _matching_key_names() -> dict[str, Any]:
    """JSON Schema of the keys a pull query accepts: the study- and series-level keywords, or their 8-digit
    tags (hex in either case), so that the document refuses exactly what ``split_query`` refuses."""
    from pydicom.datadict import tag_for_keyword

    keywords = sorted(STUDY_KEYS | SERIES_KEYS)
    tags = [f"{int(tag_for_keyword(k) or 0):08X}" for k in keywords]
    either_case = ["".join(f"[{c}{c.lower()}]" if c.isalpha() else c for c in tag) for tag in tags]
    return {"anyOf": [{"enum": keywords}, {"pattern": "^(" + "|".join(either_case) + ")$"}]}


class RetrieveRequest(BaseModel):
    # "exactly one of" for the OpenAPI document (the validator below is what enforces it)
    model_config = ConfigDict(json_schema_extra=exactly_one_of({"study_instance_uid": "string", "query": "object"}))

    study_instance_uid: DicomUID | None = Field(default=None, description="Pull this study.")
    query: SafeTextMap | None = Field(
        default=None,
        min_length=1,
        json_schema_extra=lambda schema: _restrict_keys(schema),
        description="Or pull every study matching these keys (QIDO-RS / C-FIND matching), e.g. "
        "{'PatientID': 'PGBM-002'}; series-level keys (Modality, SeriesDescription, …) pull only those series.",
    )

    @model_validator(mode="after")
    def one_of(self) -> RetrieveRequest:
        if bool(self.study_instance_uid) == bool(self.query):
            raise ValueError("give exactly one of study_instance_uid or query")
        if self.query:
            try:  # the same check the pull makes, so that a bad key is a 422 now, not a failed job later
                split_query(self.query)
            except PullQueryError as exc:
                raise ValueError(str(exc)) from exc
        return self


class PullJobOut(BaseModel):
    id: str
    pacs: str
    query: dict[str, Any]
    status: str
    studies_found: int
    instances_stored: int
    instances_failed: int
    error: str | None


@router.get("", summary="Configured PACS")
def list_pacs(ctx: ContextDep, caller: OperatorCaller) -> dict[str, str]:
    return {name: connection.url for name, connection in ctx.settings.pacs.items()}


@router.post("/{name}/retrieve", status_code=202, response_model=PullJobOut, summary="Pull from a PACS")
def retrieve(
    name: ResourceId, body: RetrieveRequest, ctx: ContextDep, session: SessionDep, caller: OperatorCaller
) -> PullJob:
    if name not in ctx.settings.pacs:
        raise HTTPException(404, f"no PACS named {name!r}; configured: {sorted(ctx.settings.pacs)}")
    query = {"StudyInstanceUID": body.study_instance_uid} if body.study_instance_uid else dict(body.query or {})
    job = PullJob(id=str(uuid.uuid4()), pacs=name, query=query, status="queued", requested_by=caller.name)
    session.add(job)
    session.commit()
    ctx.celery.send_task(PULL_FROM_PACS_TASK, args=[job.id], queue=INGEST_QUEUE, task_id=f"pull-{job.id}")
    return job


@router.get("/jobs/{id}", response_model=PullJobOut, summary="Progress of a pull")
def pull_job(id: ResourceId, session: SessionDep, caller: OperatorCaller) -> PullJob:
    job = session.get(PullJob, id)
    if job is None:
        raise HTTPException(404, f"no pull job {id}")
    return job
