"""Fixtures for the training tests: real hippocampus cases in the cached-case format of docs/contracts.md.

Until shared.datasets lands, cases are built here directly with MONAI (the same deterministic steps the
preprocessing spec applies: load, channel first, RAS, per-volume z-score over non-zero voxels, pad to 16).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.training.datasets import CASE_IDS, load_hippocampus_cases

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def hippo_cases(hippocampus_dir: Path) -> list[dict[str, Any]]:
    """Eight real cases: the first six train, the last two validate."""
    return load_hippocampus_cases(hippocampus_dir, CASE_IDS)
