"""Fixtures shared by the ingest tests."""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Real test data: $VOXELFLOW_SHARED_DATA, else <repo>/../shared/data, else /work/shared/data."""
    repo = Path(__file__).resolve().parents[2]
    for candidate in (
        os.environ.get("VOXELFLOW_SHARED_DATA"),
        repo.parent / "shared" / "data",
        "/work/shared/data",
    ):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    pytest.skip("shared data not found: set VOXELFLOW_SHARED_DATA or put it at <repo>/../shared/data")
