"""Fixtures for the preprocessing library tests: the bundled real data, located without copying."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from shared.data import shared_data_dir

torch.set_num_threads(1)  # two cores shared by the whole suite


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to shared/data; skips (not fails) where the data is not mounted, fails in CI."""
    found = shared_data_dir()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("shared data not found: set VOXELFLOW_SHARED_DATA or provide <repo>/../shared/data")
        pytest.skip("shared real-data folder not found: set VOXELFLOW_SHARED_DATA")
    return found


@pytest.fixture(scope="session")
def hippocampus(shared_data: Path) -> Path:
    return shared_data / "msd_task04_hippocampus"


@pytest.fixture(scope="session")
def totalseg(shared_data: Path) -> Path:
    return shared_data / "totalsegmentator_ct_example"


def hippo_pair(root: Path, number: str) -> dict[str, str]:
    return {
        "image": str(root / "imagesTr" / f"hippocampus_{number}.nii.gz"),
        "label": str(root / "labelsTr" / f"hippocampus_{number}.nii.gz"),
    }
