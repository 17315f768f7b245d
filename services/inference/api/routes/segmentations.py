"""``/v1/segmentations``: ask for a segmentation (reference or NIfTI upload), follow it, download outputs.

Small volumes (≤ ``sync_max_voxels``) are answered in the same request (200 with the result); larger ones
become a job on the ``inference`` queue (202 + Location). A repeated ``request_id`` returns the existing
request instead of segmenting twice. Busy: 429 + Retry-After; not ready / no GPU memory: 503 + Retry-After.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import anyio
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.datastructures import UploadFile

from services.inference.admission import OverloadedError
from services.inference.api.deps import ContextDep, SegmentationCaller, SessionDep
from services.inference.context import InferenceContext
from services.inference.model_lifecycle import ModelUnavailableError
from services.inference.models import SegmentationRequest
from services.inference.segment_request import (
    Outcome,
    create_request,
    input_key,
    new_request_id,
    run_request,
)
from services.inference.sources import (
    SERIES_URL_PATTERN,
    SourceError,
    catalogue_series,
    parse_series_url,
    series_voxels,
    volume_from_nifti,
)
from shared.auth import Principal
from shared.contracts.tasks import INFERENCE_QUEUE, SEGMENT_TASK
from shared.http import add_audit_uids
from shared.validation import SAFE_TEXT_PATTERN, DicomUID, ResourceId, exactly_one_of

router = APIRouter(prefix="/v1/segmentations", tags=["segmentations"])

REQUEST_ID_PATTERN = r"^[A-Za-z0-9_.-]{8,64}$"


class SegmentationOptions(BaseModel):
    """What every request may say, whatever its source (form fields of an upload, or JSON)."""

    request_id: str | None = Field(default=None, pattern=REQUEST_ID_PATTERN)
    model_alias: str | None = Field(default=None, max_length=64, pattern=SAFE_TEXT_PATTERN)
    largest_component: bool | None = None


class SegmentationIn(SegmentationOptions):
    """JSON body: exactly one of ``series_instance_uid`` (catalogue) or ``dicomweb_series_url``."""

    # "exactly one of" for the OpenAPI document (the validator below is what enforces it)
    model_config = ConfigDict(
        json_schema_extra=exactly_one_of({"series_instance_uid": "string", "dicomweb_series_url": "string"})
    )

    series_instance_uid: DicomUID | None = None
    dicomweb_series_url: str | None = Field(
        default=None,
        max_length=2048,
        pattern=SERIES_URL_PATTERN,
        description="http(s)://<a DICOMweb root this service may read>/studies/<uid>/series/<uid>",
    )
    send_to_pacs: bool = Field(default=False, description="Store the DICOM SEG in the PACS (needs one configured).")

    @model_validator(mode="after")
    def _one_source(self) -> SegmentationIn:
        if (self.series_instance_uid is None) == (self.dicomweb_series_url is None):
            raise ValueError("give exactly one of series_instance_uid or dicomweb_series_url")
        return self


class Finding(BaseModel):
    label: int
    name: str
    voxels: int
    volume_ml: float


class SegmentationOut(BaseModel):
    """Mirrors ``voxelflow.v1.InferenceResult`` plus the request's status and download links."""

    request_id: str
    status: str
    route: str | None
    model_name: str | None
    model_version: str | None
    registry_uri: str | None
    mask_nifti_uri: str | None
    dicom_seg_uri: str | None
    dicom_sr_uri: str | None
    findings_uri: str | None
    findings: list[Finding] | None
    latency_seconds: float | None
    pacs_status: str | None
    error: str | None


def to_out(row: SegmentationRequest) -> SegmentationOut:
    base = f"/v1/segmentations/{row.id}"
    return SegmentationOut(
        request_id=row.id,
        status=row.status,
        route=row.route,
        model_name=row.model_name,
        model_version=row.model_version,
        registry_uri=row.registry_uri,
        mask_nifti_uri=f"{base}/mask" if row.mask_key else None,
        dicom_seg_uri=f"{base}/seg" if row.seg_key else None,
        dicom_sr_uri=f"{base}/sr" if row.sr_key else None,
        findings_uri=f"{base}/findings" if row.findings_key else None,
        findings=[Finding(**f) for f in row.findings] if row.findings else None,
        latency_seconds=row.latency_seconds,
        pacs_status=row.pacs_status,
        error=row.error,
    )


def _error(status: int, detail: str, retry_after: int | None = None) -> HTTPException:
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return HTTPException(status, detail, headers=headers)


class UploadFields(BaseModel):
    """The text fields of a multipart upload, as sent (a form field is text or absent, never null)."""

    request_id: str | None = Field(default=None, pattern=REQUEST_ID_PATTERN)
    model_alias: str | None = Field(default=None, min_length=1, max_length=64, pattern=SAFE_TEXT_PATTERN)
    largest_component: Literal["true", "false"] | None = None
    patient_id: str | None = Field(
        default=None, min_length=1, max_length=64, pattern=SAFE_TEXT_PATTERN, description="routes canary traffic"
    )


def _upload_schema() -> dict[str, Any]:
    """The multipart body: the file and the text fields (their nulls dropped by shared.openapi)."""
    fields = UploadFields.model_json_schema()["properties"]
    file = {"type": "string", "format": "binary", "description": "NIfTI image (.nii or .nii.gz)"}
    return {"type": "object", "required": ["file"], "properties": {"file": file, **fields}}


# The route reads its body by hand (JSON or a multipart upload), so the OpenAPI document is told here.
SEGMENTATION_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {"schema": SegmentationIn.model_json_schema()},
        "multipart/form-data": {"schema": _upload_schema()},
    },
}


@router.post(
    "",
    summary="Segment a series (catalogue UID or DICOMweb URL, JSON) or an uploaded NIfTI (multipart 'file')",
    response_model=SegmentationOut,
    openapi_extra={"requestBody": SEGMENTATION_REQUEST_BODY},
    responses={
        202: {"description": "queued as a job", "model": SegmentationOut},
        401: {"description": "missing or unknown token"},
        403: {"description": "role may not segment, or the DICOMweb root is not one this service may read"},
        404: {"description": "the series is not in the catalogue or at its DICOMweb root; the alias is not served"},
        415: {"description": "neither application/json nor multipart/form-data"},
        422: {"description": "invalid request; not a readable 3-D NIfTI; send_to_pacs without a PACS configured"},
        429: {"description": "busy"},
        502: {"description": "the catalogue or PACS could not be reached"},
        503: {"description": "not ready"},
    },
)
async def create_segmentation(request: Request, ctx: ContextDep, caller: SegmentationCaller) -> JSONResponse:
    if not ctx.models.ready:
        raise _error(503, "the model is not loaded and warmed up yet", ctx.settings.retry_after_seconds)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await request.form()
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise HTTPException(422, "multipart upload needs a 'file' part holding a NIfTI image")
        data = await upload.read()
        try:  # the documented fields only; others are ignored, as in a JSON body
            fields = UploadFields.model_validate({k: form.get(k) for k in UploadFields.model_fields if k in form})
        except ValidationError as exc:
            raise HTTPException(422, exc.errors(include_url=False, include_context=False, include_input=False)) from exc
        submit = functools.partial(_submit_upload, ctx, caller, data, fields)
    elif content_type == "application/json":
        try:
            body = SegmentationIn.model_validate_json(await request.body())
        except ValidationError as exc:
            # without the input: invalid JSON bytes are not JSON-serialisable, and would make this a 500
            raise HTTPException(422, exc.errors(include_url=False, include_context=False, include_input=False)) from exc
        submit = functools.partial(_submit_reference, ctx, caller, body)
    else:
        raise HTTPException(415, "send application/json (a series reference) or multipart/form-data (a NIfTI file)")
    try:
        status, row = await anyio.to_thread.run_sync(submit)
    except OverloadedError as exc:
        raise _error(exc.status, str(exc), exc.retry_after) from exc
    except ModelUnavailableError as exc:
        raise _error(503, str(exc), ctx.settings.retry_after_seconds) from exc
    except SourceError as exc:
        raise HTTPException(exc.status, str(exc)) from exc
    except ConnectionError as exc:
        raise HTTPException(502, str(exc)) from exc
    add_audit_uids(request, row.id, row.source_ref if row.source_kind == "series_instance_uid" else None)
    headers = {"Location": f"/v1/segmentations/{row.id}"}
    return JSONResponse(to_out(row).model_dump(mode="json"), status_code=status, headers=headers)


def _submit_upload(
    ctx: InferenceContext, caller: Principal, data: bytes, fields: UploadFields
) -> tuple[int, SegmentationRequest]:
    largest = None if fields.largest_component is None else fields.largest_component == "true"
    body = SegmentationOptions(request_id=fields.request_id, model_alias=fields.model_alias, largest_component=largest)
    volume = volume_from_nifti(data)  # validates before anything is stored
    request_id = body.request_id or new_request_id()
    options = _options(ctx, body, patient_id=fields.patient_id)

    def store_input() -> tuple[str, str]:
        key = input_key(request_id)
        if not ctx.store.exists(key):
            ctx.store.put_bytes(key, data, content_type="application/octet-stream")
        return "nifti_uri", key

    return _dispatch(ctx, caller, body, request_id, store_input, volume.voxels, options)


def _submit_reference(
    ctx: InferenceContext, caller: Principal, body: SegmentationIn
) -> tuple[int, SegmentationRequest]:
    if body.send_to_pacs and not ctx.settings.pacs_url:
        raise SourceError("send_to_pacs asked but this service has no PACS configured")
    if body.dicomweb_series_url is not None:
        series = parse_series_url(body.dicomweb_series_url, ctx.dicomweb_roots())
        kind, ref = "dicomweb_series_url", body.dicomweb_series_url
    else:
        series = catalogue_series(ctx.settings.ingest_url, ctx.ingest_headers(), str(body.series_instance_uid))
        kind, ref = "series_instance_uid", series.series_uid
    voxels = series_voxels(series)
    request_id = body.request_id or new_request_id()
    return _dispatch(ctx, caller, body, request_id, lambda: (kind, ref), voxels, _options(ctx, body))


def _options(ctx: InferenceContext, body: SegmentationOptions, patient_id: str | None = None) -> dict[str, Any]:
    largest = ctx.settings.keep_largest_component if body.largest_component is None else body.largest_component
    options: dict[str, Any] = {"send_to_pacs": getattr(body, "send_to_pacs", False), "largest_component": largest}
    if patient_id:
        options["patient_id"] = patient_id
    return options


def _dispatch(
    ctx: InferenceContext,
    caller: Principal,
    body: SegmentationOptions,
    request_id: str,
    source: Any,
    voxels: int,
    options: dict[str, Any],
) -> tuple[int, SegmentationRequest]:
    if body.model_alias:
        try:
            ctx.models.route_for(None, body.model_alias)  # refuse an unknown alias before any work
        except ValueError as exc:  # an alias that is not served here: a reference to nothing
            raise SourceError(str(exc), status=404) from exc

    def record() -> Outcome:
        """Resolve the source (it may fetch from the PACS) and record the request, or find it again."""
        kind, ref = source()
        return create_request(
            ctx,
            request_id=request_id,
            source_kind=kind,
            source_ref=ref,
            model_alias=body.model_alias,
            options=options,
            created_by=caller.name,
            voxels=voxels,
        )

    if voxels <= ctx.settings.sync_max_voxels:
        with ctx.admission.slot():
            outcome = record()
            if outcome.reused and outcome.row.status in ("succeeded", "running", "queued"):
                return 200, outcome.row
            return 200, run_request(ctx, request_id, "sync")
    if ctx.queued_jobs() >= ctx.settings.max_queued_jobs:
        raise OverloadedError(429, "queue_full", "the inference job queue is full", ctx.settings.retry_after_seconds)
    outcome = record()
    if not outcome.reused:
        ctx.celery.send_task(SEGMENT_TASK, args=[request_id], queue=INFERENCE_QUEUE)
    return 202, outcome.row


def _get_row(session: Any, id: str) -> SegmentationRequest:
    row = session.get(SegmentationRequest, id)
    if row is None:
        raise HTTPException(404, f"no segmentation request {id}")
    return row


@router.get("/{id}", response_model=SegmentationOut, summary="Status and result of a segmentation request")
def get_segmentation(id: ResourceId, session: SessionDep, caller: SegmentationCaller) -> SegmentationOut:
    return to_out(_get_row(session, id))


DOWNLOADS = {
    "mask": ("mask_key", "application/gzip", "mask.nii.gz"),
    "seg": ("seg_key", "application/dicom", "seg.dcm"),
    "sr": ("sr_key", "application/dicom", "sr.dcm"),
    "findings": ("findings_key", "application/json", "findings.json"),
}


@router.get(
    "/{id}/{output}", summary="Download an output: mask (NIfTI), seg (DICOM SEG), sr (DICOM SR) or findings (JSON)"
)
def download(
    id: ResourceId, output: ResourceId, ctx: ContextDep, session: SessionDep, caller: SegmentationCaller
) -> StreamingResponse:
    if output not in DOWNLOADS:
        raise HTTPException(404, f"unknown output {output!r}; one of {', '.join(DOWNLOADS)}")
    attribute, media_type, filename = DOWNLOADS[output]
    row = _get_row(session, id)
    key = getattr(row, attribute)
    if key is None:
        if row.status != "succeeded":
            raise HTTPException(409, f"request {id} is {row.status}; outputs exist once it succeeded")
        raise HTTPException(404, f"request {id} has no {output} output (a DICOM SEG needs a DICOM source)")
    return StreamingResponse(
        ctx.store.iter_chunks(key),
        media_type=media_type,
        headers={"Content-Disposition": f'attachment; filename="{id}-{filename}"'},
    )
