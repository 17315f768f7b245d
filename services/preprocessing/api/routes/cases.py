"""The candidate-case pool: list and inspect cases, attach a label to a case from the catalogue."""

from __future__ import annotations

import gzip
import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, File, Form, HTTPException, Query, Request, Response, UploadFile
from fastapi import Path as PathParam
from pydantic import BaseModel
from sqlalchemy import func, select

from services.preprocessing.api.deps import BuildCaller, ContextDep, ReadCaller, SessionDep
from services.preprocessing.case_files import CaseFileError
from services.preprocessing.case_upload import CaseConflictError, CaseFiles, case_fields, record_case
from services.preprocessing.catalogue_cases import attach_label
from services.preprocessing.models import Case
from shared.http import add_audit_uids
from shared.validation import SAFE_TEXT_PATTERN, DatabaseId, PageOffset, SafeText

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


class CaseUploadOut(BaseModel):
    state: Literal["added", "updated", "unchanged"]
    case: CaseOut


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
CollectionName = Annotated[str, PathParam(pattern=NAME_PATTERN, description="letters, digits, . _ -")]
CaseName = Annotated[str, PathParam(pattern=NAME_PATTERN, description="letters, digits, . _ -")]


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
    # the route reads its body by hand (it may be hundreds of MB), so the OpenAPI document is told here
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
    responses={
        413: {"description": "the label is larger than the limit"},
        422: {"description": "empty, not a readable NIfTI, off the case's image grid, or non-integer values"},
    },
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


LABEL_VALUE_PATTERN = r"^[0-9]{1,9}$"
# label_names travels as a JSON text form field; this is what its text must hold (and what the route checks).
LABEL_NAMES_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": 'JSON {"0": "background", "1": "Anterior", …}: label value -> name',
    "propertyNames": {"pattern": LABEL_VALUE_PATTERN},
    "additionalProperties": {"type": "string", "maxLength": 64, "pattern": SAFE_TEXT_PATTERN},
    "maxProperties": 100,
}


def _label_names(text: str) -> dict[int, str]:
    try:
        names = json.loads(text)
    except ValueError as exc:
        raise HTTPException(422, f"label_names must be a JSON object {{value: name}}: {exc}") from exc
    if not isinstance(names, dict) or len(names) > LABEL_NAMES_SCHEMA["maxProperties"]:
        raise HTTPException(422, "label_names must be a JSON object of at most 100 {value: name} entries")
    bad = [
        k
        for k, v in names.items()
        if re.fullmatch(LABEL_VALUE_PATTERN[1:-1], k) is None
        or not isinstance(v, str)
        or len(v) > 64
        or re.fullmatch(SAFE_TEXT_PATTERN[1:-1], v) is None
    ]
    if bad:
        raise HTTPException(422, f"label_names entries {bad[:10]}: keys are label values 0…999999999, names text")
    return {int(k): v for k, v in names.items()}


CASE_TEXT_FIELDS = ("modality", "label_names", "patient", "source")


def _replace_schema(replacement: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    def replace(schema: dict[str, Any]) -> None:
        title = schema.get("title")
        schema.clear()
        schema.update(replacement, **({"title": title} if title else {}))

    return replace


async def _save_upload(upload: UploadFile, folder: Path, stem: str, limit: int) -> Path:
    """The upload as a NIfTI file nibabel can open (its suffix from its bytes), bounded in size."""
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"{upload.filename or stem} exceeds {limit} bytes")
    if not data:
        raise HTTPException(422, f"{stem} is empty")
    path = folder / (f"{stem}.nii.gz" if data[:2] == b"\x1f\x8b" else f"{stem}.nii")
    path.write_bytes(data)
    return path


@router.put(
    "/collections/{collection}/cases/{case_id}",
    response_model=CaseUploadOut,
    summary="Add or update one case: a NIfTI image and optionally its label map (multipart/form-data)",
    responses={
        201: {"description": "the case was added", "model": CaseUploadOut},
        409: {"description": "the collection has this case id from another source"},
        413: {"description": "a file is larger than the limit"},
        422: {"description": "a file is not a readable NIfTI, the label is off the image grid or has unknown values"},
    },
    openapi_extra={
        "requestBody": {
            "content": {"multipart/form-data": {"encoding": {"label_names": {"contentType": "application/json"}}}}
        }
    },
)
async def put_case(
    collection: CollectionName,
    case_id: CaseName,
    request: Request,
    response: Response,
    ctx: ContextDep,
    session: SessionDep,
    caller: BuildCaller,
    image: Annotated[UploadFile, File(description="the image, NIfTI (.nii or .nii.gz)")],
    label: Annotated[UploadFile | None, File(description="its label map on the image grid")] = None,
    modality: Annotated[str, Form(pattern=r"^[A-Z0-9+]{1,16}$", description="DICOM modality code(s)")] = "OT",
    label_names: Annotated[str, Form(max_length=100_000, json_schema_extra=_replace_schema(LABEL_NAMES_SCHEMA))] = "{}",
    patient: Annotated[str | None, Form(pattern=NAME_PATTERN, description="default: the case id")] = None,
    source: Annotated[
        str | None,
        Form(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/+-]{0,511}$", description="where it came from (idempotency key)"),
    ] = None,
) -> CaseUploadOut:
    """Idempotent by ``source`` (default ``upload:<collection>/<case_id>``): the same files again change nothing.

    This is how a client imports a data set it holds (``voxelflow datasets import-msd`` sends each case of
    an MSD folder here); the service never needs to see the client's file system.
    """
    # FastAPI reads an empty optional form field as absent (its default); the document says a field is
    # absent or valid, so an empty one is refused rather than silently replaced.
    form = await request.form()
    empty = sorted(name for name in CASE_TEXT_FIELDS if form.get(name) == "")
    if empty:
        raise HTTPException(422, f"form fields {empty} are empty: leave a field out to use its default")
    names = _label_names(label_names)
    limit = ctx.settings.max_case_file_bytes
    with tempfile.TemporaryDirectory(prefix="vf-case-") as workdir:
        folder = Path(workdir)
        image_path = await _save_upload(image, folder, "image", limit)
        label_path = await _save_upload(label, folder, "label", limit) if label is not None else None
        files = CaseFiles(case_id, image_path, label_path, modality, names, patient)

        def store_case() -> tuple[Case, str]:
            fields = case_fields(ctx.store, files)
            case, state = record_case(session, collection, source or f"upload:{collection}/{case_id}", fields)
            session.commit()
            return case, state

        try:
            case, state = await anyio.to_thread.run_sync(store_case)
        except CaseFileError as exc:
            raise HTTPException(422, str(exc)) from exc
        except CaseConflictError as exc:
            raise HTTPException(409, str(exc)) from exc
    add_audit_uids(request, f"{collection}/{case_id}", case.case_hash)
    if state == "added":
        response.status_code = 201
    return CaseUploadOut(state=state, case=CaseOut.model_validate(case, from_attributes=True))
