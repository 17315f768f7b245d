"""Series that ingest reconstructed become candidate cases; labels are attached to them later.

``record_series`` handles the ``preprocessing.series_ready`` message (a ``SeriesIngested`` dict). The
volume is copied to its content-addressed case key, so a dataset version never depends on ingest's
``volumes/…/g{gen}`` keys (which a later generation of the series supersedes). A flagged series (not a
volume) is acknowledged and not recorded. Redelivery is harmless: the same volume bytes change nothing.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from services.preprocessing import metrics
from services.preprocessing.case_files import case_hash, image_stats, label_stats, put_content_addressed
from services.preprocessing.case_pool import upsert_case
from services.preprocessing.models import Case
from shared.contracts import messages
from shared.db.base import session_scope, utcnow
from shared.proto.voxelflow.v1.ingest_pb2 import SeriesIngested
from shared.storage import ObjectStore

log = logging.getLogger("voxelflow.preprocessing.catalogue")


class SeriesMessageError(ValueError):
    """The message is not a usable SeriesIngested (retrying cannot help)."""


def parse_series_message(message: dict[str, Any]) -> SeriesIngested:
    try:
        parsed = messages.from_dict(message, SeriesIngested)
    except messages.MessageError as exc:
        raise SeriesMessageError(f"not a SeriesIngested message: {exc}") from exc
    if not parsed.series_instance_uid or not parsed.patient_pseudonym:
        raise SeriesMessageError("SeriesIngested needs series_instance_uid and patient_pseudonym")
    return parsed


def record_series(
    store: ObjectStore, session_factory: sessionmaker[Session], message: dict[str, Any], collection: str
) -> str:
    """Record a reconstructed series as a candidate case; returns ``added|updated|unchanged|skipped``."""
    series = parse_series_message(message)
    if series.non_volumetric_reason or not series.volume_uri:
        log.info("series %s is not a volume (%s): no case", series.series_instance_uid, series.non_volumetric_reason)
        return "skipped"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vf-case-") as workdir:
        path = Path(workdir) / "volume.nii.gz"
        store.download_file(series.volume_uri, str(path))  # ObjectNotFoundError: a retry may find it
        stats = image_stats(path)
        key, sha = put_content_addressed(store, path)
    source = f"catalogue:{series.series_instance_uid}"
    with session_scope(session_factory) as session:
        existing = session.query(Case).filter(Case.source == source).one_or_none()
        keep_label = existing is not None and existing.image_sha256 == sha
        label_key = existing.label_key if keep_label and existing else None
        label_sha = existing.label_sha256 if keep_label and existing else None
        if keep_label and existing is not None:
            stats.update({k: v for k, v in existing.stats.items() if k in ("labels_present", "label_voxels")})
        _, state = upsert_case(
            session,
            source,
            collection=collection,
            case_id=series.series_instance_uid,
            patient=series.patient_pseudonym,
            site=series.site or None,
            modality=series.modality or "OT",
            image_key=key,
            image_sha256=sha,
            label_key=label_key,
            label_sha256=label_sha,
            case_hash=case_hash(sha, label_sha),
            stats=stats,
        )
    metrics.cases_processed_total.labels("import", "catalogue").inc()
    metrics.case_seconds.labels("import").observe(time.perf_counter() - started)
    return state


def attach_label(store: ObjectStore, session: Session, case: Case, label_path: Path) -> Case:
    """Attach (or replace) the label of a case after checking it lies on the image grid.

    Raises :class:`~services.preprocessing.case_files.CaseFileError` with the reason; nothing is stored then.
    """
    stats = label_stats(label_path, case.stats)
    key, sha = put_content_addressed(store, label_path)
    case.label_key, case.label_sha256 = key, sha
    case.case_hash = case_hash(case.image_sha256, sha)
    case.stats = {**case.stats, **stats}
    case.updated_at = utcnow()
    return case
