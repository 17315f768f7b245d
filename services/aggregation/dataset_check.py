"""What a run may train on: the dataset version must exist and every requested site must have training cases."""

from __future__ import annotations

from collections import Counter

from shared.storage import ObjectStore


class DatasetProblem(ValueError):
    """The run cannot start on this dataset version (the message says why). ``status`` is the HTTP answer:
    404 when the version or a requested site is not there, 422 when the version is unusable."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def manifest_key(version_id: str) -> str:
    return f"datasets/{version_id}/manifest.json"


def training_cases_per_site(store: ObjectStore, version_id: str) -> Counter[str]:
    """Number of ``holdout.train`` cases of each site in the dataset version (the federated training split)."""
    from shared.datasets import load_manifest

    try:
        manifest = load_manifest(store, version_id)
    except (KeyError, FileNotFoundError, LookupError) as exc:
        raise DatasetProblem(f"dataset version {version_id!r} does not exist in object storage", 404) from exc
    except ValueError as exc:  # ManifestError: malformed id or corrupt manifest
        raise DatasetProblem(f"dataset version {version_id!r}: {exc}") from exc
    return Counter(case.site for case in manifest.select(split="holdout", part="train"))


def check_sites(store: ObjectStore, version_id: str, sites: list[str]) -> Counter[str]:
    counts = training_cases_per_site(store, version_id)
    empty = [site for site in sites if counts.get(site, 0) == 0]
    if empty:
        known = ", ".join(f"{s} ({n})" for s, n in sorted(counts.items())) or "none"
        raise DatasetProblem(
            f"sites without training cases in {version_id}: {', '.join(empty)}; "
            f"sites with holdout.train cases: {known}",
            404,
        )
    return counts
