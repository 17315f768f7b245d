"""Fixtures for evaluation tests: the real MSD hippocampus set (read in place, never copied)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.data import shared_data_dir


@pytest.fixture(scope="session")
def hippocampus_dir() -> Path:
    """``msd_task04_hippocampus`` of the shared data; skips where the data is not mounted (fails in CI)."""
    found = shared_data_dir()
    if found is None or not (found / "msd_task04_hippocampus").is_dir():
        if os.environ.get("CI"):
            pytest.fail("shared data not found: set VOXELFLOW_SHARED_DATA or provide <repo>/../shared/data")
        pytest.skip("shared data (msd_task04_hippocampus) not found: set VOXELFLOW_SHARED_DATA")
    return found / "msd_task04_hippocampus"
