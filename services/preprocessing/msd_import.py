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
from services.preprocessing.case_files import CaseFileError
from services.preprocessing.case_upload import CaseConflictError, CaseFiles, case_fields, msd_source, record_case
from shared.datasets.msd import case_id_of, read_msd_index
from shared.db.base import session_scope
from shared.storage import ObjectStore

log = logging.getLogger("voxelflow.preprocessing.msd")


@dataclass
class ImportResult:
    collection: str
    labels: dict[int, str]
    modality: str
    counts: dict[str, int] = field(default_factory=lambda: {"added": 0, "updated": 0, "unchanged": 0})
    errors: dict[str, str] = field(default_factory=dict)
    case_ids: list[str] = field(default_factory=list)
    seconds: float = 0.0


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
            image, label = pair
            fields = case_fields(store, CaseFiles(case_id_of(image), image, label, index.modality, index.labels))
        except CaseFileError as exc:
            return pair[0], exc
        metrics.case_seconds.labels("import").observe(time.perf_counter() - case_started)
        return pair[0], fields

    with ThreadPoolExecutor(max_workers=threads) as pool, session_scope(session_factory) as session:
        for done, (image, outcome) in enumerate(pool.map(prepare, index.pairs), start=1):
            case_id = case_id_of(image)
            try:
                if isinstance(outcome, Exception):
                    raise outcome
                _, state = record_case(session, result.collection, msd_source(index.root, image), outcome)
            except (CaseFileError, CaseConflictError) as exc:
                result.errors[case_id] = str(exc)
                metrics.cases_failed_total.labels("import").inc()
                log.warning("MSD case %s skipped: %s", case_id, exc)
            else:
                result.counts[state] += 1
                result.case_ids.append(case_id)
                metrics.cases_processed_total.labels("import", "msd").inc()
            if progress is not None:
                progress(done, len(index.pairs), case_id)
    result.seconds = time.perf_counter() - started
    return result
