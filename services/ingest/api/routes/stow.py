"""STOW-RS: store instances (PS3.18 10.5). Partial success is the norm: good instances are stored,
bad ones reported one by one in FailedSOPSequence, and one bad file never fails the whole request."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import anyio
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse

from services.ingest.api.deps import ContextDep, StoreCaller
from services.ingest.dicomweb import (
    MultipartError,
    Part,
    UnsupportedMediaTypeError,
    failed_sop_item,
    read_parts,
    referenced_sop_item,
    stow_boundary,
    stow_response,
)
from services.ingest.validation import FAILURE_STATUS, InstanceRejectedError, RejectReason
from shared.http import add_audit_uids
from shared.validation import DicomUID

log = logging.getLogger("voxelflow.ingest.stow")
router = APIRouter(prefix="/dicomweb", tags=["DICOMweb STOW-RS"])

DICOM_JSON = "application/dicom+json"
# Parts of one STOW request received at the same time (threads: the waits on PostgreSQL and S3 overlap).
STOW_PART_CONCURRENCY = 4


async def _store(request: Request, ctx: ContextDep, study_uid: str | None) -> JSONResponse:
    try:
        boundary = stow_boundary(request.headers.get("content-type"))
    except UnsupportedMediaTypeError as exc:
        raise HTTPException(415, str(exc)) from exc
    except MultipartError as exc:
        raise HTTPException(400, str(exc)) from exc
    try:
        parts = await read_parts(request.stream(), boundary)
    except MultipartError as exc:
        raise HTTPException(400, str(exc)) from exc
    if not parts:
        raise HTTPException(400, "the multipart body holds no parts")

    base = ctx.settings.public_url.rstrip("/")
    # One outcome per part, in part order: (referenced item or None, failed item or None, audit UID).
    outcomes: list[tuple[dict[str, object] | None, dict[str, Any] | None, str | None]] = [
        (None, None, None) for _ in parts
    ]

    def store_part(index: int, part: Part) -> None:
        try:
            if part.content_type.split(";")[0].strip().lower() != "application/dicom":
                raise InstanceRejectedError(
                    RejectReason.UNPARSEABLE,
                    f"part Content-Type {part.content_type!r} is not application/dicom",
                )
            received = ctx.receiver.receive_stream(part.file, part.size, "stow", expected_study_uid=study_uid)
        except InstanceRejectedError as exc:
            item = failed_sop_item(
                exc.sop_class_uid,
                exc.sop_instance_uid,
                exc.failure_status,
                f"{exc.reason.value}: {exc.message}",
            )
            # The audit log holds no original identifiers: a refused instance is named by its pseudonym.
            audit = ctx.deidentifier.pseudonymise_uid(exc.sop_instance_uid) if exc.sop_instance_uid else None
            outcomes[index - 1] = (None, item, audit)
        except Exception as exc:
            # An unforeseen failure of one part must not turn the whole request into a 500: the parts
            # stored before it would go unreported and the PACS would send them again, or give up.
            log.exception("STOW part %d failed unexpectedly", index)
            item = failed_sop_item(
                "",
                "",
                FAILURE_STATUS[RejectReason.STORAGE_ERROR],
                f"{RejectReason.STORAGE_ERROR.value}: part {index} could not be processed ({type(exc).__name__})",
            )
            outcomes[index - 1] = (None, item, None)
        else:
            url = (
                f"{base}/dicomweb/studies/{received.study_instance_uid}/series/{received.series_instance_uid}"
                f"/instances/{received.sop_instance_uid}"
            )
            item_ref = referenced_sop_item(received.sop_class_uid, received.original_sop_instance_uid, url)
            outcomes[index - 1] = (item_ref, None, received.sop_instance_uid)
        finally:
            part.file.close()

    # Parts are received concurrently (bounded): each waits on PostgreSQL and S3 most of its time, and
    # every part is its own idempotent claim-put-mark sequence, as concurrent STOW requests already are.
    limiter = anyio.CapacityLimiter(STOW_PART_CONCURRENCY)
    async with anyio.create_task_group() as group:
        for index, part in enumerate(parts, start=1):
            group.start_soon(partial(anyio.to_thread.run_sync, store_part, index, part, limiter=limiter))

    referenced = [ref for ref, _, _ in outcomes if ref is not None]
    failed = [fail for _, fail, _ in outcomes if fail is not None]
    add_audit_uids(request, *(uid for _, _, uid in outcomes))

    retrieve = f"{base}/dicomweb/studies/{study_uid}" if study_uid else None
    body = stow_response(retrieve, referenced, failed)
    if not failed:
        status = 200
    elif referenced:
        status = 202  # PS3.18: some instances stored, some failed
    else:
        storage_down = all(
            item["00081197"]["Value"][0] == FAILURE_STATUS[RejectReason.STORAGE_ERROR] for item in failed
        )
        status = 503 if storage_down else 409
    return JSONResponse(body, status_code=status, media_type=DICOM_JSON)


# What the OpenAPI document says about STOW-RS: the route reads its multipart body by hand.
STOW_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "description": "PS3.18 10.5: one application/dicom Part-10 instance per part; the closing delimiter is required.",
    "content": {
        'multipart/related; type="application/dicom"': {
            "schema": {"type": "string", "format": "binary"},
        }
    },
}
_STOW_RESPONSE = {DICOM_JSON: {"schema": {"type": "object", "description": "PS3.18 store-instances response"}}}
STOW_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "every instance stored", "content": _STOW_RESPONSE},
    202: {"description": "some instances stored, the others listed in FailedSOPSequence", "content": _STOW_RESPONSE},
    400: {"description": "malformed multipart body (nothing stored)"},
    401: {"description": "missing or unknown token"},
    403: {"description": "role may not store"},
    408: {"description": "the body was not received in time"},
    409: {"description": "no instance stored; each listed with its reason", "content": _STOW_RESPONSE},
    413: {"description": "body larger than the limit"},
    415: {"description": 'not multipart/related; type="application/dicom"'},
    503: {"description": "object storage unavailable", "content": _STOW_RESPONSE},
}


@router.post(
    "/studies",
    summary="Store instances (STOW-RS)",
    openapi_extra={"requestBody": STOW_REQUEST_BODY},
    responses=STOW_RESPONSES,
    response_class=JSONResponse,
)
async def store_instances(request: Request, ctx: ContextDep, caller: StoreCaller) -> JSONResponse:
    return await _store(request, ctx, None)


@router.post(
    "/studies/{study_uid}",
    summary="Store instances of one study (STOW-RS)",
    openapi_extra={"requestBody": STOW_REQUEST_BODY},
    responses=STOW_RESPONSES,
    response_class=JSONResponse,
)
async def store_study_instances(
    study_uid: DicomUID, request: Request, ctx: ContextDep, caller: StoreCaller
) -> JSONResponse:
    return await _store(request, ctx, study_uid)
