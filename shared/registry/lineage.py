"""Names fixed by the registry contract (docs/contracts.md, docs/registry.md): artifact paths, tags, aliases."""

from __future__ import annotations

# artifact paths and aliases are the contract shared.contracts.artifacts; re-exported for the registry code
from shared.contracts.artifacts import (  # noqa: F401
    ALIASES,
    CANDIDATE,
    CHAMPION,
    LABELS,
    MODEL_DIR,
    PER_CASE,
    PLOTS_DIR,
    PREPROCESSING,
    TRAINING_CONFIG,
    WEIGHTS,
)

#: version tags every registered version carries (empty string where a run has no such thing, e.g.
#: ``federated_run_id`` of a centrally trained model)
LINEAGE_TAGS = ("dataset_version", "preprocessing_hash", "git_sha", "federated_run_id", "strategy", "test_dice")
