"""Versioned datasets (manifests) and the preprocessed-case cache (see docs/contracts.md, docs/preprocessing.md)."""

from shared.datasets.cache import (
    BulkResult,
    CachedCaseDataset,
    CacheError,
    cache_key,
    load_cached,
    make_loader,
    preprocess_case,
    preprocess_cases,
    store_case_file,
)
from shared.datasets.manifest import (
    PARTS,
    CaseRecord,
    DatasetManifest,
    ManifestConflictError,
    ManifestError,
    case_file_key,
    compute_case_hash,
    compute_version_id,
    load_manifest,
    manifest_key,
    save_manifest,
)

__all__ = [
    "PARTS",
    "BulkResult",
    "CacheError",
    "CachedCaseDataset",
    "CaseRecord",
    "DatasetManifest",
    "ManifestConflictError",
    "ManifestError",
    "cache_key",
    "case_file_key",
    "compute_case_hash",
    "compute_version_id",
    "load_cached",
    "load_manifest",
    "make_loader",
    "manifest_key",
    "preprocess_case",
    "preprocess_cases",
    "save_manifest",
    "store_case_file",
]
