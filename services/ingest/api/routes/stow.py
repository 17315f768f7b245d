"""STOW-RS: store instances (PS3.18 10.5). Partial success is the norm: good instances are stored,
bad ones reported one by one in FailedSOPSequence, and one bad file never fails the whole request."""

from __future__ import annotations

import logging
from typing import Any

import anyio
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse

from services.ingest.api.deps import ContextDep, StoreCaller
from services.ingest.dicomweb import (
    MultipartError,
    UnsupportedMediaTypeError,
    failed_sop_item,
    read_parts,
    referenced_sop_item,
    stow_boundary,
    stow_response,
)
from services.ingest.receiver import batches
from services.ingest.validation import FAILURE_STATUS, InstanceRejectedError, RejectReason
from shared.http import add_audit_uids
from shared.validation import DicomUID

log = logging.getLogger("voxelflow.ingest.stow")
router = APIRouter(prefix="/dicomweb", tags=["DICOMweb STOW-RS"])

DICOM_JSON = "application/dicom+json"


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

    def refused(index: int, exc: Exception) -> None:
        if isinstance(exc, InstanceRejectedError):
            item = failed_sop_item(
                exc.sop_class_uid,
                exc.sop_instance_uid,
                exc.failure_status,
                f"{exc.reason.value}: {exc.message}",
            )
            # The audit log holds no original identifiers: a refused instance is named by its pseudonym.
            audit = ctx.deidentifier.pseudonymise_uid(exc.sop_instance_uid) if exc.sop_instance_uid else None
            outcomes[index] = (None, item, audit)
            return
        # An unforeseen failure of one part must not turn the whole request into a 500: the parts
        # stored before it would go unreported and the PACS would send them again, or give up.
        log.error("STOW part %d failed unexpectedly", index + 1, exc_info=exc)
        item = failed_sop_item(
            "",
            "",
            FAILURE_STATUS[RejectReason.STORAGE_ERROR],
            f"{RejectReason.STORAGE_ERROR.value}: part {index + 1} could not be processed ({type(exc).__name__})",
        )
        outcomes[index] = (None, item, None)

    def store_batch(batch: range) -> None:
        """One batch of parts: the receiver parses each once and claims their rows in one transaction."""
        accepted: list[int] = []
        try:
            for index in batch:
                part = parts[index]
                if part.content_type.split(";")[0].strip().lower() != "application/dicom":
                    refused(
                        index,
                        InstanceRejectedError(
                            RejectReason.UNPARSEABLE,
                            f"part Content-Type {part.content_type!r} is not application/dicom",
                        ),
                    )
                else:
                    accepted.append(index)
            received = ctx.receiver.receive_streams(
                [(parts[i].file, parts[i].size) for i in accepted], "stow", expected_study_uid=study_uid
            )
            for index, outcome in zip(accepted, received, strict=True):
                if isinstance(outcome, Exception):
                    refused(index, outcome)
                    continue
                url = (
                    f"{base}/dicomweb/studies/{outcome.study_instance_uid}/series/{outcome.series_instance_uid}"
                    f"/instances/{outcome.sop_instance_uid}"
                )
                item_ref = referenced_sop_item(outcome.sop_class_uid, outcome.original_sop_instance_uid, url)
                outcomes[index] = (item_ref, None, outcome.sop_instance_uid)
        except Exception as exc:  # the receiver itself failed (a bug): every part of the batch fails, reported
            log.exception("STOW batch of parts %d-%d failed unexpectedly", batch.start + 1, batch.stop)
            for index in batch:
                if outcomes[index] == (None, None, None):
                    refused(index, exc)
        finally:
            for index in batch:
                parts[index].file.close()

    # A request is received in batches of at most BATCH_MAX_INSTANCES parts (bounded memory: a batch's
    # encoded copies are held until its rows are claimed), one after the other, in a worker thread.
    try:
        for batch in batches(len(parts)):
            await anyio.to_thread.run_sync(store_batch, batch)
    finally:  # also when the request is cancelled half-way
        for part in parts:
            part.file.close()

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
