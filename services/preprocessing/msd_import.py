"""Import a Medical Segmentation Decathlon folder (``dataset.json`` + ``imagesTr``/``labelsTr``) into the
case pool: every image and label is stored content-addressed and recorded with its statistics.

MSD has no patient information, so each case is its own patient (docs/contracts.md). A bad case (unreadable
file, label off the image grid, unknown label value) is reported with its reason and skipped; the other
cases are imported. Re-importing the same folder uploads nothing and changes no row.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from services.preprocessing import metrics
from services.preprocessing.case_files import (
    CaseFileError,
    case_hash,
    image_stats,
    label_stats,
    put_content_addressed,
    sha256_file,
)
from services.preprocessing.case_pool import upsert_case
from shared.datasets.msd import MsdFormatError, MsdIndex, case_id_of, read_msd_index
from shared.db.base import session_scope
from shared.storage import ObjectStore

log = logging.getLogger("voxelflow.preprocessing.msd")

__all__ = ["ImportResult", "MsdFormatError", "MsdIndex", "import_msd", "read_msd_index"]


@dataclass
class ImportResult:
    collection: str
    labels: dict[int, str]
    modality: str
    counts: dict[str, int] = field(default_factory=lambda: {"added": 0, "updated": 0, "unchanged": 0})
    errors: dict[str, str] = field(default_factory=dict)
    case_ids: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _prepare_case(store: ObjectStore, index: MsdIndex, image: Path, label: Path | None) -> dict[str, Any]:
    """Hash, check and upload one pair (runs in a worker thread); returns the row fields."""
    if not image.is_file():
        raise CaseFileError(f"image {image.name} listed in dataset.json does not exist")
    if label is not None and not label.is_file():
        raise CaseFileError(f"label {label.name} listed in dataset.json does not exist")
    stats = image_stats(image)
    label_sha = label_key = None
    if label is not None:
        stats.update(label_stats(label, stats, allowed=set(index.labels)))
        label_key, label_sha = put_content_addressed(store, label, sha256_file(label))
    image_key, image_sha = put_content_addressed(store, image, sha256_file(image))
    stats["label_names"] = {str(k): v for k, v in sorted(index.labels.items())}
    case_id = case_id_of(image)
    return {
        "case_id": case_id,
        "patient": case_id,
        "site": None,
        "modality": index.modality,
        "image_key": image_key,
        "image_sha256": image_sha,
        "label_key": label_key,
        "label_sha256": label_sha,
        "case_hash": case_hash(image_sha, label_sha),
        "stats": stats,
    }


def import_msd(
    store: ObjectStore,
    session_factory: sessionmaker[Session],
    folder: Path,
    collection: str | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    threads: int = 4,
) -> ImportResult:
    """Import every training pair of ``folder`` into ``collection`` (default: the dataset's name)."""
    started = time.perf_counter()
    index = read_msd_index(Path(folder))
    result = ImportResult(collection or index.name, index.labels, index.modality)

    def prepare(pair: tuple[Path, Path | None]) -> tuple[Path, dict[str, Any] | Exception]:
        case_started = time.perf_counter()
        try:
            fields = _prepare_case(store, index, *pair)
        except CaseFileError as exc:
            return pair[0], exc
        metrics.case_seconds.labels("import").observe(time.perf_counter() - case_started)
        return pair[0], fields

    with ThreadPoolExecutor(max_workers=threads) as pool, session_scope(session_factory) as session:
        for done, (image, outcome) in enumerate(pool.map(prepare, index.pairs), start=1):
            case_id = case_id_of(image)
            if isinstance(outcome, Exception):
                result.errors[case_id] = str(outcome)
                metrics.cases_failed_total.labels("import").inc()
                log.warning("MSD case %s skipped: %s", case_id, outcome)
            else:
                source = f"msd:{index.root.name}/{image.relative_to(index.root)}"
                _, state = upsert_case(session, source, collection=result.collection, **outcome)
                result.counts[state] += 1
                result.case_ids.append(case_id)
                metrics.cases_processed_total.labels("import", "msd").inc()
            if progress is not None:
                progress(done, len(index.pairs), case_id)
    result.seconds = time.perf_counter() - started
    return result
