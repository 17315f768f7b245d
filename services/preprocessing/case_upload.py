"""One case (an image, optionally its label) into the case pool: checked, stored content-addressed, recorded.

The single path every case takes, whether it arrives as an upload over the API (``PUT
/collections/{collection}/cases/{case_id}``, what ``voxelflow datasets import-msd`` sends) or from an MSD
folder the service can read itself (:mod:`services.preprocessing.msd_import`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.preprocessing.case_files import (
    CaseFileError,
    case_hash,
    image_stats,
    label_stats,
    put_content_addressed,
    sha256_file,
)
from services.preprocessing.case_pool import upsert_case
from services.preprocessing.models import Case
from shared.storage import ObjectStore


class CaseConflictError(ValueError):
    """The collection already holds this case id from another source."""


@dataclass(frozen=True)
class CaseFiles:
    """What describes one case before it is stored."""

    case_id: str
    image: Path
    label: Path | None
    modality: str
    label_names: dict[int, str]
    patient: str | None = None  # MSD has no patients: each case is its own (docs/contracts.md)


def case_fields(store: ObjectStore, files: CaseFiles) -> dict[str, Any]:
    """Check and upload one image/label pair; the catalogue row's fields. Thread-safe (no session)."""
    if not files.image.is_file():
        raise CaseFileError(f"image {files.image.name} does not exist")
    if files.label is not None and not files.label.is_file():
        raise CaseFileError(f"label {files.label.name} does not exist")
    stats = image_stats(files.image)
    label_sha = label_key = None
    if files.label is not None:
        stats.update(label_stats(files.label, stats, allowed=set(files.label_names) or None))
        label_key, label_sha = put_content_addressed(store, files.label, sha256_file(files.label))
    image_key, image_sha = put_content_addressed(store, files.image, sha256_file(files.image))
    stats["label_names"] = {str(k): v for k, v in sorted(files.label_names.items())}
    return {
        "case_id": files.case_id,
        "patient": files.patient or files.case_id,
        "site": None,
        "modality": files.modality,
        "image_key": image_key,
        "image_sha256": image_sha,
        "label_key": label_key,
        "label_sha256": label_sha,
        "case_hash": case_hash(image_sha, label_sha),
        "stats": stats,
    }


def record_case(session: Session, collection: str, source: str, fields: dict[str, Any]) -> tuple[Case, str]:
    """Insert or update the row; ``added|updated|unchanged``. The same case id from another source is a conflict."""
    other = session.scalar(
        select(Case).where(Case.collection == collection, Case.case_id == fields["case_id"], Case.source != source)
    )
    if other is not None:
        raise CaseConflictError(
            f"collection {collection!r} already has case {fields['case_id']!r} from {other.source!r}"
        )
    return upsert_case(session, source, collection=collection, **fields)


def msd_source(root: Path, image: Path) -> str:
    """An MSD case's source: the folder's name and the image's path in it, whoever sends it.

    The same for the service reading a folder and for a client uploading from one, so re-importing
    the same folder either way changes nothing.
    """
    return f"msd:{root.name}/{image.relative_to(root).as_posix()}"
