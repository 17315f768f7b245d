"""Fixtures for the preprocessing library tests: the bundled real data, located without copying."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # two cores shared by the whole suite


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
