"""Shared fixtures for ingest tests: locate the real data set without copying it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path | None:
    """The shared real-data folder, or None when it is not available.

    Order: ``$VOXELFLOW_SHARED_DATA``, then ``<repo>/../shared/data`` (the
    layout of the main checkout), then ``/work/shared/data`` (git worktrees
    live elsewhere, so the relative path does not resolve from them).
    """
    candidates = []
    env = os.environ.get("VOXELFLOW_SHARED_DATA")
    if env:
        candidates.append(Path(env))
    candidates += [_REPO_ROOT.parent / "shared" / "data", Path("/work/shared/data")]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to shared/data; skips (not fails) where the data is not mounted."""
    found = shared_data_dir()
    if found is None:
        pytest.skip(
            "shared real-data folder not found: set VOXELFLOW_SHARED_DATA or provide "
            "<repo>/../shared/data or /work/shared/data"
        )
    return found
