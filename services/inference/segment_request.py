"""A segmentation request from its row to its outputs; the same code runs in the API (small volumes,
synchronously) and in the worker (``inference.segment``, large volumes).

Idempotent by request ID: outputs go to fixed keys ``inference/{id}/…`` and the DICOM SEG has UIDs derived
from the ID, so a redelivered job rewrites the same objects and re-sends the same SEG; a request that
already succeeded is returned as it is.
"""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
from pydicom.filebase import DicomBytesIO

from services.inference import metrics
from services.inference.admission import OverloadedError, check_gpu_memory, estimate_inference_bytes
from services.inference.destinations import destination_for
from services.inference.dicom_seg import AlgorithmInfo, build_dicom_seg
from services.inference.dicom_sr import build_measurement_report, structure_volumes_ml
from services.inference.model_lifecycle import ModelUnavailableError
from services.inference.models import SegmentationRequest
from services.inference.pacs_upload import PacsRefusedError
from services.inference.routing_steps import record_step
from services.inference.segmentation import segment_volume
from services.inference.sources import (
    SourceError,
    SourceVolume,
    catalogue_series,
    fetch_series,
    parse_series_url,
    volume_from_nifti,
)
from shared.contracts import layout
from shared.db.base import session_scope, utcnow

if TYPE_CHECKING:
    from services.inference.context import InferenceContext

log = logging.getLogger("voxelflow.inference.requests")

SOURCE_KINDS = ("series_instance_uid", "dicomweb_series_url", "nifti_uri")


def new_request_id() -> str:
    return uuid.uuid4().hex


def input_key(request_id: str) -> str:
    return layout.inference_input_key(request_id)


@dataclass
class Outcome:
    row: SegmentationRequest
    reused: bool = False


def create_request(
    ctx: InferenceContext,
    *,
    request_id: str,
    source_kind: str,
    source_ref: str,
    model_alias: str | None,
    options: dict[str, Any],
    created_by: str | None,
    voxels: int | None = None,
) -> Outcome:
    """Insert the request row, or return the existing one when the client repeats a request ID.

    A ``patient_id`` in ``options`` (given with a NIfTI upload) is never stored: the row keeps its keyed
    pseudonym, in ``patient_ref`` and in the options the job routes by.
    """
    options = dict(options)
    given_patient_id = options.pop("patient_id", None)
    ref = ctx.patient_ref(given_patient_id) if given_patient_id else None
    if ref:
        options["patient_ref"] = ref
    with session_scope(ctx.session_factory) as session:
        existing = session.get(SegmentationRequest, request_id)
        if existing is not None:
            if (existing.source_kind, existing.source_ref) != (source_kind, source_ref):
                raise SourceError(f"request id {request_id} already names another source", status=409)
            return Outcome(existing, reused=True)
        row = SegmentationRequest(
            id=request_id,
            status="queued",
            source_kind=source_kind,
            source_ref=source_ref,
            model_alias=model_alias or "",
            options=options,
            created_by=created_by,
            voxels=voxels,
            patient_ref=ref,
        )
        session.add(row)
        session.flush()
        return Outcome(row)


def load_source(ctx: InferenceContext, row: SegmentationRequest) -> SourceVolume:
    if row.source_kind == "nifti_uri":
        # the pseudonym stands for the patient: routing needs a stable per-patient value, not the original
        return volume_from_nifti(ctx.store.get_bytes(row.source_ref), patient_id=row.options.get("patient_ref"))
    if row.source_kind == "dicomweb_series_url":
        return fetch_series(parse_series_url(row.source_ref, ctx.dicomweb_roots()))
    if row.source_kind == "series_instance_uid":
        return fetch_series(catalogue_series(ctx.settings.ingest_url, ctx.ingest_headers(), row.source_ref))
    raise SourceError(f"unknown source kind {row.source_kind!r}")


def _update(ctx: InferenceContext, request_id: str, **values: Any) -> SegmentationRequest:
    with session_scope(ctx.session_factory) as session:
        row = session.get(SegmentationRequest, request_id)
        if row is None:
            raise SourceError(f"no segmentation request {request_id}", status=404)
        for key, value in values.items():
            setattr(row, key, value)
        session.flush()
        return row


def run_request(ctx: InferenceContext, request_id: str, mode: str) -> SegmentationRequest:
    """Segment, store the outputs, optionally send the SEG to the PACS; the row records every step."""
    with ctx.session_factory() as session:
        row = session.get(SegmentationRequest, request_id)
    if row is None:
        raise SourceError(f"no segmentation request {request_id}", status=404)
    if row.status == "succeeded":
        return row
    started = time.perf_counter()
    route, version = "unknown", "unknown"
    try:
        _update(ctx, request_id, status="running", error=None)
        volume = load_source(ctx, row)
        reference = row.patient_ref or ctx.patient_ref(volume.patient_id)
        route = ctx.models.route_for(reference, row.model_alias or None)
        with ctx.models.acquire(route) as model:
            version = model.version
            check_gpu_memory(
                estimate_inference_bytes(
                    model.in_channels, len(model.labels), model.roi_size, ctx.settings.sw_batch_size
                ),
                ctx.settings.gpu_memory_reserve_fraction,
                ctx.settings.retry_after_seconds,
            )
            result = segment_volume(model, volume, largest_component=row.options.get("largest_component"))
            algorithm = AlgorithmInfo(
                model.name,
                model.version,
                model.registry_uri,
                request_id,
                dataset_version=model.dataset_version,
                code_version=model.code_version,
            )
            labels = dict(model.labels)
        metrics.inference_duration_seconds.labels(route, version).observe(result.model_seconds)
        metrics.windows_total.labels(route, version).inc(result.windows)
        keys = _store_outputs(ctx, request_id, volume, result.mask, result.findings, labels, algorithm)
        step: dict[str, Any] = {"request_id": request_id, "options": row.options, "series_uid": row.source_ref}
        record_step(ctx, "SEGMENTED", **step, detail=f"{algorithm.model_name} v{algorithm.model_version}")
        pacs_status = None
        if row.options.get("send_to_pacs") and "seg" in keys:
            destination = row.options.get("destination") or ctx.settings.pacs_url
            pacs_status = _send_to_pacs(ctx, [keys["seg"], keys["sr"]], destination)
            record_step(ctx, "SENT", **step, detail=str(destination))
        elif row.options.get("rule_id") is not None:  # a routed series must reach its destination: say why not
            raise ValueError("the source is not DICOM, so there is no DICOM SEG to send")
        elapsed = time.perf_counter() - started
        done = _update(
            ctx,
            request_id,
            status="succeeded",
            route=route,
            model_name=algorithm.model_name,
            model_version=algorithm.model_version,
            registry_uri=algorithm.registry_uri,
            patient_ref=reference,
            voxels=volume.voxels,
            mask_key=keys["mask"],
            seg_key=keys.get("seg"),
            findings_key=keys["findings"],
            findings=result.findings,
            pacs_status=pacs_status,
            latency_seconds=elapsed,
            finished_at=utcnow(),
        )
        metrics.requests_total.labels(route, version, mode, "succeeded").inc()
        metrics.request_duration_seconds.labels(mode).observe(elapsed)
        return done
    except (OverloadedError, ModelUnavailableError) as exc:
        _update(ctx, request_id, status="rejected", error=f"{type(exc).__name__}: {exc}"[:4000], finished_at=utcnow())
        metrics.requests_total.labels(route, version, mode, "rejected").inc()
        raise
    except (SourceError, ValueError, PacsRefusedError) as exc:
        _update(ctx, request_id, status="failed", error=f"{type(exc).__name__}: {exc}"[:4000], finished_at=utcnow())
        metrics.requests_total.labels(route, version, mode, "failed").inc()
        raise
    except Exception as exc:
        # transient (network, PACS) or internal: the job may be retried; the row says what happened meanwhile
        _update(
            ctx,
            request_id,
            status="failed" if mode == "sync" else "retrying",
            error=f"{type(exc).__name__}: {exc}"[:4000],
        )
        metrics.requests_total.labels(route, version, mode, "error").inc()
        raise


def _store_outputs(
    ctx: InferenceContext,
    request_id: str,
    volume: SourceVolume,
    mask: np.ndarray,
    findings: list[dict[str, Any]],
    labels: dict[int, str],
    algorithm: AlgorithmInfo,
) -> dict[str, str]:
    keys = {"mask": layout.inference_mask_key(request_id), "findings": layout.inference_findings_key(request_id)}
    image = nib.Nifti1Image(mask.astype(np.uint8), volume.affine)
    image.header.set_xyzt_units("mm")
    buffer = io.BytesIO()
    file_map = image.make_file_map({"image": buffer, "header": buffer})
    image.to_file_map(file_map)
    import gzip

    ctx.store.put_bytes(keys["mask"], gzip.compress(buffer.getvalue(), mtime=0), content_type="application/gzip")
    if volume.datasets:
        seg = build_dicom_seg(mask, volume.affine, volume.datasets, labels, algorithm, ctx.settings.manufacturer)
        volumes = structure_volumes_ml(mask, volume.affine, [value for value in labels if value])
        sr = build_measurement_report(
            seg,
            volume.datasets,
            {str(labels[value])[:64]: ml for value, ml in volumes.items()},
            algorithm,
            ctx.settings.manufacturer,
        )
        keys["seg"] = layout.inference_seg_key(request_id)
        keys["sr"] = layout.inference_sr_key(request_id)
        for key, dataset in ((keys["seg"], seg), (keys["sr"], sr)):
            out = DicomBytesIO()
            dataset.save_as(out, enforce_file_format=True)
            ctx.store.put_bytes(key, out.getvalue(), content_type="application/dicom")
    document = {
        "request_id": request_id,
        "model_name": algorithm.model_name,
        "model_version": algorithm.model_version,
        "registry_uri": algorithm.registry_uri,
        "series_instance_uid": volume.series_uid,
        "findings": findings,
    }
    ctx.store.put_bytes(keys["findings"], json.dumps(document, indent=2).encode(), content_type="application/json")
    return keys


def _send_to_pacs(ctx: InferenceContext, keys: list[str], url: str | None) -> str:
    """SEG and SR together, to ``url`` (``pacs_url``, or a routing rule's destination): STOW-RS or C-STORE by
    its scheme. The PACS credentials go to ``pacs_url`` only, never to another destination."""
    import pydicom

    if not url:
        raise SourceError("send_to_pacs asked but no PACS is configured (VOXELFLOW_PACS_URL)")
    datasets = [pydicom.dcmread(io.BytesIO(ctx.store.get_bytes(key))) for key in keys]
    headers = ctx.pacs_headers() if url == ctx.settings.pacs_url else {}
    destination = destination_for(url, headers, ctx.settings.dicom_calling_aet)
    destination.send(datasets)
    return "sent"
