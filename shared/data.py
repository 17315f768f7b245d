"""Where the bundled real data lives: ``$VOXELFLOW_SHARED_DATA``, else ``../shared/data`` beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """The data folder, or None. ``/work/shared/data`` is also tried for git worktrees outside the checkout."""
    candidates = [os.environ.get("VOXELFLOW_SHARED_DATA"), REPO_ROOT.parent / "shared" / "data", "/work/shared/data"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None
