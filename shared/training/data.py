"""A site's training and validation data from a dataset version (docs/contracts.md), for train_local.

Reads the manifest with ``shared.datasets.load_manifest``, picks the site's cases of ``holdout.train`` /
``holdout.val`` and serves the cached preprocessed dicts through ``CachedCaseDataset``; the augmentation
is the dataset's own preprocessing spec (``build_transforms(spec, "augment")``), so a model is trained
with exactly the pipeline the version was built with. Every case is read up front: a case that has not
been preprocessed yet fails the job at once with a message naming the missing key, instead of after
hours of training or silently with fewer cases than the manifest says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.datasets import CachedCaseDataset, CacheError, DatasetManifest, ManifestError, load_manifest
from shared.preprocessing import PreprocessingSpec, SpecError, build_transforms
from shared.storage import ObjectStore


class UnknownDatasetVersion(LookupError):
    """No (valid) manifest for the version ID, or it lacks the requested split."""


class MissingCachedCase(LookupError):
    """A case of the split has no preprocessed cache entry yet."""


@dataclass
class SiteData:
    manifest: DatasetManifest
    train: CachedCaseDataset
    val: CachedCaseDataset
    augment: Any  # the spec's augmentation Compose


def _dataset(store: ObjectStore, manifest: DatasetManifest, records: list[Any]) -> CachedCaseDataset:
    dataset = CachedCaseDataset(store, records, manifest.preprocessing_hash)
    try:
        dataset.prefetch()
    except CacheError as exc:
        raise MissingCachedCase(f"dataset {manifest.version_id}: {exc}") from None
    return dataset


def load_site_data(store: ObjectStore, version_id: str, site: str | None, split: str = "holdout") -> SiteData:
    """``site``'s cases of ``split`` (None = all sites: the centralised baseline), cached and in memory."""
    try:
        manifest = load_manifest(store, version_id)
        train_records = manifest.select(split, "train", site)
        val_records = manifest.select(split, "val", site)
    except (KeyError, ManifestError) as exc:
        raise UnknownDatasetVersion(f"unknown dataset version {version_id!r}: {exc}") from None
    try:
        augment = build_transforms(PreprocessingSpec.from_dict(manifest.preprocessing), "augment")
    except SpecError as exc:
        raise UnknownDatasetVersion(f"dataset {version_id}: its preprocessing spec does not build: {exc}") from None
    return SiteData(manifest, _dataset(store, manifest, train_records), _dataset(store, manifest, val_records), augment)
