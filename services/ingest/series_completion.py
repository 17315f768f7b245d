"""A series is complete once no instance arrived for the stable age (DICOM has no end-of-series
signal; Orthanc's "stable series" works the same way). Then it is rebuilt into a volume, or flagged
with the reason it is not one, and announced to preprocessing with a ``SeriesIngested`` message. The same
message is offered to inference's routing rules (``inference.route_series`` on ``routing_queue``), with what a
rule matches on: description, body part, SOP class, the AE that sent it, the site.

Idempotent: the outcome is written only if the series is still in the generation that was examined,
so a redelivered task, or one racing a late instance, never announces a stale or double result.
"""

from __future__ import annotations

import datetime as dt
import logging
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from services.ingest import metrics
from services.ingest.context import IngestContext
from services.ingest.models import Instance, Series
from services.ingest.pixels import undecodable_series_reason
from services.ingest.volume import NonVolumetricSeriesError, SeriesVolume, reconstruct_series
from shared.contracts import layout, messages
from shared.contracts.tasks import ROUTE_SERIES_TASK, SERIES_READY_TASK
from shared.db.base import session_scope, utcnow
from shared.proto.voxelflow.v1.ingest_pb2 import SeriesIngested

log = logging.getLogger("voxelflow.ingest.series")


@dataclass(frozen=True)
class FinalizeOutcome:
    state: str  # "volume" | "flagged" | "not_stable" | "skipped"
    retry_in_seconds: float = 0.0
    message: SeriesIngested | None = None


def finalize_series(ctx: IngestContext, series_uid: str, now: dt.datetime | None = None) -> FinalizeOutcome:
    now = now or utcnow()
    with session_scope(ctx.session_factory) as session:
        series = session.scalar(select(Series).where(Series.series_instance_uid == series_uid))
        if series is None or series.status != "receiving":
            return FinalizeOutcome("skipped")
        last = series.last_received_at
        if last.tzinfo is None:  # SQLite returns naive datetimes
            last = last.replace(tzinfo=dt.UTC)
        quiet_for = (now - last).total_seconds()
        if quiet_for < ctx.settings.series_stable_seconds:
            return FinalizeOutcome("not_stable", ctx.settings.series_stable_seconds - quiet_for)
        generation = series.generation
        stored = session.execute(
            select(Instance.object_key, Instance.sop_class_uid, Instance.calling_ae_title)
            .where(Instance.series_id == series.id, Instance.state == "stored")
            .order_by(Instance.id)
        ).all()
        keys = [row.object_key for row in stored]
        first_header = session.scalar(
            select(Instance.dicom_json)
            .where(Instance.series_id == series.id, Instance.state == "stored")
            .order_by(Instance.id)
            .limit(1)
        )
        study_uid = series.study.study_instance_uid
        routing_description = series.routing_description
        message = SeriesIngested(
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            patient_pseudonym=series.study.patient.pseudonym,
            modality=series.modality or "",
            site=series.site,
            instance_count=len(keys),
            received_at=last.isoformat(),
            series_description=series.series_description or "",
            body_part_examined=_header_text(first_header, "00180015"),
            sop_class_uid=_most_common(row.sop_class_uid for row in stored),
            calling_ae_title=_most_common(row.calling_ae_title for row in stored),
        )

    volumes: list[dict[str, object]] = []
    reason = None
    with tempfile.TemporaryDirectory(prefix="vf-series-") as workdir:
        paths = []
        for index, key in enumerate(keys):
            path = Path(workdir) / f"{index:06d}.dcm"
            ctx.store.download_file(key, str(path))
            paths.append(path)
        # stored as sent, flagged here: decoders registered for a transfer syntax may still refuse its data
        # (12-bit JPEG Extended with GDCM and Pillow), which reconstruction would report as a failed task
        undecodable = undecodable_series_reason(paths)
        try:
            if undecodable:
                raise NonVolumetricSeriesError("undecodable_pixel_data", undecodable)
            reconstructed = reconstruct_series(paths)
        except NonVolumetricSeriesError as exc:
            reason = str(exc)  # "reason_code: message", the message says where (gaps, repeated positions)
        else:
            for index, volume in enumerate(reconstructed):
                name = volume.label or ("volume" if len(reconstructed) == 1 else f"volume{index}")
                volumes.append(_store_volume(ctx, volume, series_uid, generation, name, Path(workdir)))

    status = "flagged" if reason else "volume"
    with session_scope(ctx.session_factory) as session:
        written = session.execute(
            update(Series)
            .where(
                Series.series_instance_uid == series_uid,
                Series.generation == generation,
                Series.status == "receiving",
            )
            .values(status=status, non_volumetric_reason=reason, volumes=volumes)
        ).rowcount  # type: ignore[attr-defined]
    if not written:
        log.info("series %s changed while it was reconstructed; a later check will finalise it", series_uid)
        return FinalizeOutcome("skipped")

    metrics.series_reconstructed_total.labels(status).inc()
    if reason:
        message.non_volumetric_reason = reason
    else:
        first = volumes[0]
        message.volume_uri = str(first["key"])
        message.shape.extend(first["shape"])
        message.spacing_mm.extend(first["spacing_mm"])
    ctx.celery.send_task(
        SERIES_READY_TASK,
        args=[messages.to_dict(message)],
        queue=ctx.settings.preprocessing_queue,
        task_id=f"series-ready-{series_uid}-g{generation}",
    )
    if ctx.settings.routing_queue:  # offered to inference's routing rules; they decide whether to segment it
        offer = SeriesIngested()
        offer.CopyFrom(message)
        # the description as sent goes to the routing decision only, never to the research side
        offer.series_description = routing_description or message.series_description
        ctx.celery.send_task(
            ROUTE_SERIES_TASK,
            args=[messages.to_dict(offer)],
            queue=ctx.settings.routing_queue,
            task_id=f"route-series-{series_uid}-g{generation}",
        )
    log.info("series %s finalised: %s", series_uid, status, extra={"series_uid": series_uid, "status": status})
    return FinalizeOutcome(status, message=message)


def _most_common(values: Iterable[str | None]) -> str:
    """The value most instances carry (a series is one SOP class and one sender, but need not be), "" if none."""
    counts = Counter(v for v in values if v)
    return counts.most_common(1)[0][0] if counts else ""


def _header_text(header: dict[str, Any] | None, tag: str) -> str:
    """A text attribute of a DICOM JSON header (the catalogue's ``dicom_json``), "" when absent or empty."""
    values = ((header or {}).get(tag) or {}).get("Value") or []
    return str(values[0]).strip() if values and values[0] is not None else ""


def _store_volume(
    ctx: IngestContext, volume: SeriesVolume, series_uid: str, generation: int, name: str, workdir: Path
) -> dict[str, object]:
    """Write one volume (and, for diffusion, its FSL .bval/.bvec) and return its catalogue entry.

    The entry keeps the fields it always had (key, label, shape, spacing_mm, affine_ras) and adds what a
    4-D or resampled volume needs to be understood (shared.contracts.layout says what 4-D means):
    frames, frame_axis, b-values and their sidecar keys, and what the reconstruction did (metadata:
    gantry tilt, collapsed duplicates, mosaic, echo time).
    """
    key = layout.volume_key(series_uid, generation, name)
    nifti_path = workdir / f"{name}.nii.gz"
    volume.to_nifti().to_filename(str(nifti_path))
    ctx.store.put_file(key, str(nifti_path), "application/gzip")
    entry: dict[str, object] = {
        "key": key,
        "label": volume.label,
        "shape": [int(s) for s in volume.array.shape],
        "spacing_mm": [float(s) for s in volume.spacing],
        "affine_ras": [[float(v) for v in row] for row in volume.affine],
        "frames": volume.frames,
        "metadata": dict(volume.metadata),
    }
    if volume.frames > 1:
        entry["frame_axis"] = volume.metadata.get("frame_axis", "time")
    if volume.b_values:
        bvecs = volume.fsl_bvecs()
        bval_key = layout.volume_bval_key(series_uid, generation, name)
        bvec_key = layout.volume_bvec_key(series_uid, generation, name)
        ctx.store.put_bytes(bval_key, (" ".join(f"{b:g}" for b in volume.b_values) + "\n").encode(), "text/plain")
        rows = "".join(" ".join(f"{v:.6f}" for v in row) + "\n" for row in bvecs)
        ctx.store.put_bytes(bvec_key, rows.encode(), "text/plain")
        entry.update({"b_values": list(volume.b_values), "bval_key": bval_key, "bvec_key": bvec_key})
    return entry
