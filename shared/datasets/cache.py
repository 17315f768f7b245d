"""The preprocessed-case cache and the training reader over it.

Writer: :func:`preprocess_case` runs the spec's ``preprocess`` stage on one case's raw files and stores
``preprocessed/{pipeline_hash}/{case_hash}.pt`` (the dict described in docs/contracts.md). The key is a
function of content only (raw bytes and deterministic steps), so a rerun, another dataset version with
the same case, or a retried Celery task costs one ``stat``.

Reader: :class:`CachedCaseDataset` loads those dicts (once; then from memory) and applies the training
augmentation; :func:`make_loader` wraps it in MONAI's ThreadDataLoader, which keeps the in-memory cache
shared (no worker processes to copy it into) while augmentation runs in a background thread.
"""

from __future__ import annotations

import hashlib
import io
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from shared.datasets.manifest import CaseRecord, case_file_key
from shared.storage import ObjectNotFoundError, ObjectStore

__all__ = [
    "BulkResult",
    "CacheError",
    "CachedCaseDataset",
    "cache_key",
    "load_cached",
    "make_loader",
    "preprocess_case",
    "preprocess_cases",
    "store_case_file",
]

log = logging.getLogger(__name__)

#: progress(done, total, case_id, outcome) with outcome "built", "cached" or "failed".
ProgressCallback = Callable[[int, int, str, str], None]


class CacheError(RuntimeError):
    """A case could not be preprocessed or read back; the message names the case and the cause."""


def cache_key(pipeline_hash: str, case_hash: str) -> str:
    return f"preprocessed/{pipeline_hash}/{case_hash}.pt"


def store_case_file(store: ObjectStore, path: str | Path) -> tuple[str, str]:
    """Put a raw ``.nii.gz`` under its content address; returns ``(key, sha256)``. Same bytes: stored once."""
    path = Path(path)
    if not path.name.endswith(".nii.gz"):
        raise ValueError(f"{path}: raw case files are stored as .nii.gz")
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    sha = digest.hexdigest()
    key = case_file_key(sha)
    if not store.exists(key):
        store.put_file(key, str(path), content_type="application/gzip", metadata={"sha256": sha})
    return key, sha


def _fetch_verified(store: ObjectStore, key: str, sha256: str, target: Path) -> None:
    digest = hashlib.sha256()
    try:
        with open(target, "wb") as out:
            for chunk in store.iter_chunks(key):
                digest.update(chunk)
                out.write(chunk)
    except ObjectNotFoundError:
        raise CacheError(f"raw file {key} is missing from the store") from None
    if digest.hexdigest() != sha256:
        raise CacheError(f"raw file {key} has sha256 {digest.hexdigest()}, the manifest says {sha256}")


def _to_cache_dict(out: dict[str, Any], case: CaseRecord, pipeline_hash: str) -> dict[str, Any]:
    image = out["image"]
    affine = torch.as_tensor(image.affine if hasattr(image, "affine") else torch.eye(4), dtype=torch.float64)
    image_t = torch.as_tensor(image.as_tensor() if hasattr(image, "as_tensor") else image).to(torch.float32)
    if not torch.isfinite(image_t).all():
        raise CacheError(f"case {case.case_id}: preprocessing produced NaN/Inf in the image")
    result: dict[str, Any] = {
        "image": image_t.contiguous(),
        "affine": affine.clone(),
        "case_id": case.case_id,
        "pipeline_hash": pipeline_hash,
    }
    if out.get("label") is not None:
        label = out["label"]
        label_t = torch.as_tensor(label.as_tensor() if hasattr(label, "as_tensor") else label)
        rounded = torch.round(label_t.to(torch.float32))
        if label_t.is_floating_point() and not torch.equal(rounded, label_t.to(torch.float32)):
            raise CacheError(f"case {case.case_id}: label has non-integer values after preprocessing")
        if rounded.min() < 0 or rounded.max() > 255:
            raise CacheError(f"case {case.case_id}: label values outside 0..255 cannot be stored as uint8")
        if tuple(label_t.shape[1:]) != tuple(image_t.shape[1:]):
            raise CacheError(
                f"case {case.case_id}: image {tuple(image_t.shape)} and label {tuple(label_t.shape)} grids differ"
            )
        result["label"] = rounded.to(torch.uint8).contiguous()
    return result


def preprocess_case(store: ObjectStore, case: CaseRecord, spec: Any, *, transforms: Any = None) -> str:
    """Make sure ``preprocessed/{spec.hash}/{case.case_hash}.pt`` exists; return its key.

    Skips all work when the key exists. Raw files are verified against the manifest's sha256 before use.
    ``transforms`` lets a bulk caller pass the built ``preprocess`` Compose once.
    """
    from shared.preprocessing import build_transforms

    key = cache_key(spec.hash, case.case_hash)
    if store.exists(key):
        return key
    pipeline = transforms if transforms is not None else build_transforms(spec, "preprocess")
    with tempfile.TemporaryDirectory(prefix="vf-case-") as tmp:
        data: dict[str, Any] = {"image": str(Path(tmp) / "image.nii.gz")}
        _fetch_verified(store, case.image_key, case.image_sha256, Path(data["image"]))
        if case.label_key is not None and case.label_sha256 is not None:
            data["label"] = str(Path(tmp) / "label.nii.gz")
            _fetch_verified(store, case.label_key, case.label_sha256, Path(data["label"]))
        try:
            out = pipeline(data)
        except Exception as exc:
            raise CacheError(f"case {case.case_id}: preprocessing failed: {type(exc).__name__}: {exc}") from exc
    buffer = io.BytesIO()
    torch.save(_to_cache_dict(out, case, spec.hash), buffer)
    store.put_bytes(key, buffer.getvalue(), metadata={"case-id": case.case_id, "pipeline-hash": spec.hash})
    return key


@dataclass
class BulkResult:
    """What :func:`preprocess_cases` did: keys of the cases now cached, and the failures with their reason."""

    keys: dict[str, str] = field(default_factory=dict)
    built: int = 0
    cached: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def preprocess_cases(
    store: ObjectStore,
    cases: Sequence[CaseRecord],
    spec: Any,
    progress: ProgressCallback | None = None,
    *,
    workers: int = 1,
) -> BulkResult:
    """Cache many cases; one failing case is recorded in ``failed`` and never stops the others.

    ``progress(done, total, case_id, outcome)`` is called after every case (long builds report as they go).
    ``workers`` > 1 overlaps S3 transfers with compute in threads.
    """
    from concurrent.futures import ThreadPoolExecutor

    from shared.preprocessing import build_transforms

    pipeline = build_transforms(spec, "preprocess")
    result = BulkResult()
    lock = threading.Lock()
    start = time.perf_counter()
    total = len(cases)

    def one(case: CaseRecord) -> None:
        key = cache_key(spec.hash, case.case_hash)
        try:
            if store.exists(key):
                outcome = "cached"
            else:
                preprocess_case(store, case, spec, transforms=pipeline)
                outcome = "built"
        except Exception as exc:
            outcome = "failed"
            reason = str(exc) if isinstance(exc, CacheError) else f"{type(exc).__name__}: {exc}"
            log.warning("preprocessing %s failed: %s", case.case_id, reason)
        with lock:
            if outcome == "failed":
                result.failed[case.case_id] = reason
            else:
                result.keys[case.case_id] = key
                setattr(result, outcome, getattr(result, outcome) + 1)
            done = len(result.keys) + len(result.failed)
            if progress is not None:
                progress(done, total, case.case_id, outcome)

    if workers <= 1:
        for case in cases:
            one(case)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(one, cases))
    result.seconds = time.perf_counter() - start
    return result


def load_cached(store: ObjectStore, key: str) -> dict[str, Any]:
    try:
        data = store.get_bytes(key)
    except ObjectNotFoundError:
        raise CacheError(f"{key} is not cached: run preprocess_cases for this dataset and pipeline first") from None
    return torch.load(io.BytesIO(data), weights_only=True)


class CachedCaseDataset(Dataset):
    """A torch Dataset of cached case dicts, read from the store once and then served from memory.

    Items are shallow copies of the cached dict with ``transform`` (the ``augment`` Compose) applied, so
    augmentation never modifies what is cached. ``keep_in_memory=False`` re-reads every access (for sets
    larger than RAM).
    """

    def __init__(
        self,
        store: ObjectStore,
        cases: Sequence[CaseRecord],
        pipeline_hash: str,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        *,
        keep_in_memory: bool = True,
    ) -> None:
        self.store = store
        self.cases = list(cases)
        self.pipeline_hash = pipeline_hash
        self.transform = transform
        self.keep_in_memory = keep_in_memory
        self._memory: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.cases)

    def _cached(self, index: int) -> dict[str, Any]:
        item = self._memory.get(index)
        if item is None:
            case = self.cases[index]
            item = load_cached(self.store, cache_key(self.pipeline_hash, case.case_hash))
            if item.get("pipeline_hash") != self.pipeline_hash:
                written_by = item.get("pipeline_hash")
                raise CacheError(f"case {case.case_id}: cached entry was written by pipeline {written_by}")
            if self.keep_in_memory:
                self._memory[index] = item
        return item

    def prefetch(self, progress: ProgressCallback | None = None, workers: int = 4) -> None:
        """Read every case into memory up front (S3 reads in parallel threads), reporting progress."""
        from concurrent.futures import ThreadPoolExecutor

        done = 0
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for index, _ in zip(range(len(self)), pool.map(self._cached, range(len(self))), strict=True):
                done += 1
                if progress is not None:
                    progress(done, len(self), self.cases[index].case_id, "cached")

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self._cached(index))
        return self.transform(item) if self.transform is not None else item


def make_loader(
    store: ObjectStore,
    cases: Iterable[CaseRecord],
    pipeline_hash: str,
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    *,
    batch_size: int = 2,
    shuffle: bool = True,
    num_workers: int = 0,
    prefetch: bool = False,
    **loader_args: Any,
) -> Any:
    """A MONAI ThreadDataLoader over :class:`CachedCaseDataset`.

    Batches are collated with ``pad_list_data_collate``: cases of one set still differ in shape after
    ``DivisiblePadd``, and padding to the largest in the batch is what MONAI does for that.
    """
    from monai.data import ThreadDataLoader, pad_list_data_collate

    dataset = CachedCaseDataset(store, list(cases), pipeline_hash, transform)
    if prefetch:
        dataset.prefetch()
    loader_args.setdefault("collate_fn", pad_list_data_collate)
    # ThreadDataLoader is typed for monai.data.Dataset but takes any map-style torch Dataset
    return ThreadDataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        **loader_args,
    )
