"""The candidate-case pool: list and inspect cases, attach a label to a case from the catalogue."""

from __future__ import annotations

import gzip
import tempfile
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel
from sqlalchemy import func, select

from services.preprocessing.api.deps import BuildCaller, ContextDep, ReadCaller, SessionDep
from services.preprocessing.case_files import CaseFileError
from services.preprocessing.catalogue_cases import attach_label
from services.preprocessing.models import Case
from shared.http import add_audit_uids
from shared.validation import DatabaseId, PageOffset, SafeText

router = APIRouter(tags=["cases"])


class CaseOut(BaseModel):
    id: int
    collection: str
    case_id: str
    source: str
    patient: str
    site: str | None
    modality: str
    image_key: str
    label_key: str | None
    case_hash: str
    stats: dict[str, Any]


class CasePage(BaseModel):
    total: int
    cases: list[CaseOut]


@router.get("/cases", response_model=CasePage, summary="Candidate cases dataset versions are built from")
def list_cases(
    session: SessionDep,
    caller: ReadCaller,
    collection: SafeText | None = None,
    labelled: bool | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: PageOffset = 0,
) -> CasePage:
    query = select(Case)
    if collection is not None:
        query = query.where(Case.collection == collection)
    if labelled is not None:
        query = query.where(Case.label_key.is_not(None) if labelled else Case.label_key.is_(None))
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(Case.collection, Case.case_id).limit(limit).offset(offset))
    return CasePage(total=total, cases=[CaseOut.model_validate(r, from_attributes=True) for r in rows])


@router.get("/cases/{id}", response_model=CaseOut, summary="One candidate case")
def get_case(id: DatabaseId, session: SessionDep, caller: ReadCaller) -> CaseOut:
    case = session.get(Case, id)
    if case is None:
        raise HTTPException(404, f"no case {id}")
    return CaseOut.model_validate(case, from_attributes=True)


@router.put(
    "/cases/{id}/label",
    response_model=CaseOut,
    summary="Attach a label map (NIfTI, .nii or .nii.gz body) on the case's image grid",
)
async def put_label(
    id: DatabaseId, request: Request, ctx: ContextDep, session: SessionDep, caller: BuildCaller
) -> CaseOut:
    case = session.get(Case, id)
    if case is None:
        raise HTTPException(404, f"no case {id}")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > ctx.settings.max_label_bytes:
            raise HTTPException(413, f"label exceeds {ctx.settings.max_label_bytes} bytes")
    if not body:
        raise HTTPException(422, "empty body: send the label NIfTI as the request body")

    def store_label() -> None:
        """Checks, upload and commit off the event loop (a label can be hundreds of MB)."""
        data = bytes(body) if body[:2] == b"\x1f\x8b" else gzip.compress(bytes(body), mtime=0)
        with tempfile.TemporaryDirectory(prefix="vf-label-") as workdir:
            path = Path(workdir) / "label.nii.gz"
            path.write_bytes(data)
            attach_label(ctx.store, session, case, path)
        session.commit()

    try:
        await anyio.to_thread.run_sync(store_label)
    except CaseFileError as exc:
        raise HTTPException(422, str(exc)) from exc
    add_audit_uids(request, case.case_id, case.label_sha256)
    return CaseOut.model_validate(case, from_attributes=True)
