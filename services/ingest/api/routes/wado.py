"""WADO-RS: retrieve instances (multipart/related application/dicom) and metadata (DICOM JSON); frames,
pixel bulk data, rendered images and thumbnails (PS3.18 10.4).

Instances stream from object storage part by part, in the transfer syntax the Accept header's
``transfer-syntax`` parameter names (Explicit VR Little Endian without one, ``*`` as stored), transcoded by
pydicom where a decoder and an encoder exist, else 406 with the reason. The metadata comes from the
catalogue, the pixel data's BulkDataURI pointing at the instance's bulkdata resource."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Annotated, Any

import pydicom
from fastapi import APIRouter, Header, HTTPException, Path, Query
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydicom.dataset import Dataset
from sqlalchemy import select

from services.ingest import pixels
from services.ingest.api.deps import ContextDep, QueryCaller, SessionDep
from services.ingest.dicomweb import multipart_related
from services.ingest.models import Instance, Series, Study
from services.ingest.query import instance_json
from shared.validation import DicomUID

log = logging.getLogger("voxelflow.ingest.wado")

router = APIRouter(prefix="/dicomweb", tags=["DICOMweb WADO-RS"])

_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "nothing stored under that UID"}}
_NOT_ACCEPTABLE: dict[int | str, dict[str, Any]] = {
    406: {"description": "the media type or transfer syntax asked for cannot be produced here (the reason says why)"}
}
INSTANCES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the instances, one application/dicom part each",
        "content": {'multipart/related; type="application/dicom"': {"schema": {"type": "string", "format": "binary"}}},
    },
    **_NOT_FOUND,
    **_NOT_ACCEPTABLE,
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


#: no length or pattern constraint: as HTTP allows, an Accept the server cannot parse is answered in the
#: default representation (or 406 with the reason), so there is no "invalid" Accept to refuse with 422
AcceptHeader = Annotated[str | None, Header(description="PS3.18 8.7: media type, transfer-syntax")]


def _not_acceptable(exc: pixels.NotAcceptableError) -> HTTPException:
    return HTTPException(406, str(exc))


def _load(ctx: ContextDep, instance: Instance) -> Dataset:
    return pydicom.dcmread(io.BytesIO(ctx.store.get_bytes(instance.object_key)))


def _retrieve(ctx: ContextDep, instances: list[Instance], accept: str | None = None) -> StreamingResponse:
    """Stream the instances in the negotiated transfer syntax. What is stored in it streams from object
    storage as it is; the rest is transcoded one instance at a time. One instance is transcoded before the
    response starts, so a failure is a 406; in a study, an instance whose decoder fails on its data is sent
    as stored, its part's Content-Type saying so."""
    try:
        wanted = pixels.negotiate(accept, pixels.DICOM, {i.transfer_syntax_uid for i in instances})
    except pixels.NotAcceptableError as exc:
        raise _not_acceptable(exc) from exc
    target = wanted.transfer_syntax
    first: bytes | None = None
    if len(instances) == 1 and target not in (None, instances[0].transfer_syntax_uid):
        try:
            first = pixels.encode_instance(pixels.transcode(_load(ctx, instances[0]), target))
        except pixels.NotAcceptableError as exc:
            raise _not_acceptable(exc) from exc

    def parts() -> Iterator[tuple[str, Any]]:
        for instance in instances:
            stored = instance.transfer_syntax_uid
            if first is not None:
                yield wanted.part_content_type(stored), [first]
            elif target in (None, stored):
                yield wanted.part_content_type(stored), ctx.store.iter_chunks(instance.object_key)
            else:
                try:
                    data = pixels.encode_instance(pixels.transcode(_load(ctx, instance), target))
                except pixels.NotAcceptableError as exc:
                    log.warning("sent %s as stored: %s", instance.sop_instance_uid, exc)
                    yield f"{pixels.DICOM}; transfer-syntax={stored}", ctx.store.iter_chunks(instance.object_key)
                else:
                    yield wanted.part_content_type(stored), [data]

    media_type, body = multipart_related(parts(), pixels.DICOM)
    return StreamingResponse(body, media_type=media_type)


#: pixel data elements; which one an instance has is not in the catalogue, so it is inferred as PS3.3 does
PIXEL_TAGS = {"7FE00010": "PixelData", "7FE00008": "FloatPixelData", "7FE00009": "DoubleFloatPixelData"}


def _pixel_element(instance: Instance) -> tuple[str, str]:
    """(tag, VR) of the instance's pixel data for its BulkDataURI (PS3.18 F.2.7: OB or OW)."""
    header = instance.dicom_json or {}
    bits = (header.get("00280100", {}).get("Value") or [16])[0]
    if bits == 64:
        return "7FE00009", "OD"
    if bits == 32 and "00280103" not in header:  # float pixel data has no Pixel Representation
        return "7FE00008", "OF"
    encapsulated = pydicom.uid.UID(instance.transfer_syntax_uid).is_encapsulated
    implicit = instance.transfer_syntax_uid == pydicom.uid.ImplicitVRLittleEndian
    return "7FE00010", "OB" if encapsulated or (bits <= 8 and not implicit) else "OW"


def _metadata(ctx: ContextDep, instances: list[Instance]) -> JSONResponse:
    base = ctx.settings.public_url.rstrip("/")
    items = []
    for instance in instances:
        item = instance_json(instance, base, {"all"})
        tag, vr = _pixel_element(instance)
        item[tag] = {"vr": vr, "BulkDataURI": f"{item['00081190']['Value'][0]}/bulkdata/{tag}"}
        items.append(dict(sorted(item.items())))
    return JSONResponse(items, media_type="application/dicom+json")


@router.get("/studies/{study_uid}", summary="Retrieve a study", responses=INSTANCES, response_class=StreamingResponse)
def retrieve_study(
    study_uid: DicomUID, ctx: ContextDep, session: SessionDep, caller: QueryCaller, accept: AcceptHeader = None
) -> StreamingResponse:
    return _retrieve(ctx, _instances(session, ctx, study_uid), accept)


@router.get(
    "/studies/{study_uid}/series/{series_uid}",
    summary="Retrieve a series",
    responses=INSTANCES,
    response_class=StreamingResponse,
)
def retrieve_series(
    study_uid: DicomUID,
    series_uid: DicomUID,
    ctx: ContextDep,
    session: SessionDep,
    caller: QueryCaller,
    accept: AcceptHeader = None,
) -> StreamingResponse:
    return _retrieve(ctx, _instances(session, ctx, study_uid, series_uid), accept)


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
    accept: AcceptHeader = None,
) -> StreamingResponse:
    return _retrieve(ctx, _instances(session, ctx, study_uid, series_uid, sop_uid), accept)


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


# ------------------------------------------------------------------------------- frames, bulk data, rendered

BULK: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "one part per frame (application/octet-stream, or the compressed media type asked for)",
        "content": {
            'multipart/related; type="application/octet-stream"': {"schema": {"type": "string", "format": "binary"}}
        },
    },
    400: {"description": "malformed frame list"},
    **_NOT_FOUND,
    **_NOT_ACCEPTABLE,
}
RENDERED: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the frame rendered (VOI window, MONOCHROME1 inverted, fitted into the viewport)",
        "content": {m: {"schema": {"type": "string", "format": "binary"}} for m in pixels.RENDERED_MEDIA},
    },
    400: {"description": "malformed window, viewport or quality"},
    **_NOT_FOUND,
    **_NOT_ACCEPTABLE,
}
INSTANCE_PATH = "/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"
FrameList = Annotated[str, Path(max_length=1000, description="1-based frame numbers, comma-separated")]
FrameNumber = Annotated[int, Path(ge=1, le=2**31 - 1, description="1-based frame number")]
Window = Annotated[str | None, Query(max_length=200, description="center,width[,linear|linear-exact|sigmoid]")]
Viewport = Annotated[str | None, Query(max_length=200, description="vw,vh[,sx,sy,sw,sh]")]
Quality = Annotated[str | None, Query(max_length=8, description="JPEG quality, 1..100")]


def _one(session: SessionDep, ctx: ContextDep, study_uid: str, series_uid: str, sop_uid: str) -> Instance:
    return _instances(session, ctx, study_uid, series_uid, sop_uid)[0]


def _bulk_response(ctx: ContextDep, instance: Instance, accept: str | None, frame_list: str | None) -> Response:
    stored = instance.transfer_syntax_uid
    try:
        wanted = pixels.negotiate(accept, "application/octet-stream", [stored])
        dataset = _load(ctx, instance)
        numbers = None if frame_list is None else pixels.parse_frame_list(frame_list, pixels.number_of_frames(dataset))
        if wanted.transfer_syntax:
            pixels.transcode(dataset, wanted.transfer_syntax)
        values = pixels.pixel_bulk(dataset) if numbers is None else pixels.frames(dataset, numbers)
    except pixels.NotAcceptableError as exc:
        raise _not_acceptable(exc) from exc
    except pixels.BadRequestError as exc:
        raise HTTPException(400, str(exc)) from exc
    except pixels.NoSuchFrameError as exc:
        raise HTTPException(404, str(exc)) from exc
    content_type = wanted.part_content_type(stored)
    media_type, body = multipart_related(((content_type, [value]) for value in values), content_type.split(";")[0])
    return Response(b"".join(body), media_type=media_type)


@router.get(INSTANCE_PATH + "/frames/{frame_list}", summary="Retrieve frames", responses=BULK, response_class=Response)
def retrieve_frames(
    study_uid: DicomUID,
    series_uid: DicomUID,
    sop_uid: DicomUID,
    frame_list: FrameList,
    ctx: ContextDep,
    session: SessionDep,
    caller: QueryCaller,
    accept: AcceptHeader = None,
) -> Response:
    """PS3.18 10.4: the frames as uncompressed little-endian bytes (the default), as stored
    (``transfer-syntax=*``), or in a compressed media type (``type="image/jls"`` …) when an encoder exists."""
    return _bulk_response(ctx, _one(session, ctx, study_uid, series_uid, sop_uid), accept, frame_list)


@router.get(
    INSTANCE_PATH + "/bulkdata/{tag}", summary="Retrieve pixel bulk data", responses=BULK, response_class=Response
)
def retrieve_bulkdata(
    study_uid: DicomUID,
    series_uid: DicomUID,
    sop_uid: DicomUID,
    tag: Annotated[str, Path(max_length=8)],
    ctx: ContextDep,
    session: SessionDep,
    caller: QueryCaller,
    accept: AcceptHeader = None,
) -> Response:
    """The target of the metadata's BulkDataURI: the pixel data, native as one part, encapsulated (as stored)
    as one part per frame. Other bulk elements are not kept apart from the instance (retrieve it whole)."""
    instance = _one(session, ctx, study_uid, series_uid, sop_uid)
    if tag.upper() != _pixel_element(instance)[0]:
        raise HTTPException(404, f"no bulk data {tag}: only the pixel data ({_pixel_element(instance)[0]}) is")
    return _bulk_response(ctx, instance, accept, None)


def _rendered(
    ctx: ContextDep,
    instance: Instance,
    frame: int,
    accept: str | None,
    window: str | None,
    viewport: str | None,
    quality: str | None,
    default_viewport: tuple[int, int] | None = None,
) -> Response:
    try:
        media_type = pixels.rendered_media_type(accept)
        options = pixels.parse_render_options(window, viewport, quality, default_viewport)
        dataset = _load(ctx, instance)
        count = pixels.number_of_frames(dataset)
        if frame > count:
            raise pixels.NoSuchFrameError(f"no frame {frame}: the instance has {count} frame(s)")
        image = pixels.render(dataset, frame - 1, media_type, options)
    except pixels.NotAcceptableError as exc:
        raise _not_acceptable(exc) from exc
    except pixels.BadRequestError as exc:
        raise HTTPException(400, str(exc)) from exc
    except pixels.NoSuchFrameError as exc:
        raise HTTPException(404, str(exc)) from exc
    return Response(image, media_type=media_type)


@router.get(INSTANCE_PATH + "/rendered", summary="Render an instance", responses=RENDERED, response_class=Response)
def rendered_instance(
    study_uid: DicomUID,
    series_uid: DicomUID,
    sop_uid: DicomUID,
    ctx: ContextDep,
    session: SessionDep,
    caller: QueryCaller,
    accept: AcceptHeader = None,
    window: Window = None,
    viewport: Viewport = None,
    quality: Quality = None,
) -> Response:
    """The first frame as JPEG (default) or PNG: the query's window, else the instance's, else the range."""
    instance = _one(session, ctx, study_uid, series_uid, sop_uid)
    return _rendered(ctx, instance, 1, accept, window, viewport, quality)


@router.get(
    INSTANCE_PATH + "/frames/{frame}/rendered", summary="Render a frame", responses=RENDERED, response_class=Response
)
def rendered_frame(
    study_uid: DicomUID,
    series_uid: DicomUID,
    sop_uid: DicomUID,
    frame: FrameNumber,
    ctx: ContextDep,
    session: SessionDep,
    caller: QueryCaller,
    accept: AcceptHeader = None,
    window: Window = None,
    viewport: Viewport = None,
    quality: Quality = None,
) -> Response:
    instance = _one(session, ctx, study_uid, series_uid, sop_uid)
    return _rendered(ctx, instance, frame, accept, window, viewport, quality)


THUMBNAIL_SIZE = (128, 128)


def _representative(instances: list[Instance]) -> Instance:
    """The middle instance of the first series: a slice from the middle of the volume, not its edge."""
    series_id = instances[0].series_id
    first_series = [i for i in instances if i.series_id == series_id]
    return first_series[len(first_series) // 2]


@router.get(
    INSTANCE_PATH + "/thumbnail", summary="Thumbnail of an instance", responses=RENDERED, response_class=Response
)
def instance_thumbnail(
    study_uid: DicomUID,
    series_uid: DicomUID,
    sop_uid: DicomUID,
    ctx: ContextDep,
    session: SessionDep,
    caller: QueryCaller,
    accept: AcceptHeader = None,
    viewport: Viewport = None,
) -> Response:
    instance = _one(session, ctx, study_uid, series_uid, sop_uid)
    return _rendered(ctx, instance, 1, accept, None, viewport, None, THUMBNAIL_SIZE)


@router.get(
    "/studies/{study_uid}/series/{series_uid}/thumbnail",
    summary="Thumbnail of a series",
    responses=RENDERED,
    response_class=Response,
)
def series_thumbnail(
    study_uid: DicomUID,
    series_uid: DicomUID,
    ctx: ContextDep,
    session: SessionDep,
    caller: QueryCaller,
    accept: AcceptHeader = None,
    viewport: Viewport = None,
) -> Response:
    instance = _representative(_instances(session, ctx, study_uid, series_uid))
    return _rendered(ctx, instance, 1, accept, None, viewport, None, THUMBNAIL_SIZE)


@router.get(
    "/studies/{study_uid}/thumbnail", summary="Thumbnail of a study", responses=RENDERED, response_class=Response
)
def study_thumbnail(
    study_uid: DicomUID,
    ctx: ContextDep,
    session: SessionDep,
    caller: QueryCaller,
    accept: AcceptHeader = None,
    viewport: Viewport = None,
) -> Response:
    instance = _representative(_instances(session, ctx, study_uid))
    return _rendered(ctx, instance, 1, accept, None, viewport, None, THUMBNAIL_SIZE)
