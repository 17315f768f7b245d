"""Names fixed by the registry contract (docs/contracts.md, docs/registry.md): artifact paths, tags, aliases."""

from __future__ import annotations

MODEL_DIR = "model"
WEIGHTS = f"{MODEL_DIR}/weights.pt"
TRAINING_CONFIG = f"{MODEL_DIR}/training-config.yaml"
PREPROCESSING = f"{MODEL_DIR}/preprocessing.json"
LABELS = f"{MODEL_DIR}/labels.json"
#: per-case held-out Dice, logged at registration; what the promotion gate compares
PER_CASE = "evaluation/per_case.json"
PLOTS_DIR = "plots"

CANDIDATE = "candidate"
CHAMPION = "champion"
ALIASES = (CANDIDATE, CHAMPION)

#: version tags every registered version carries (empty string where a run has no such thing, e.g.
#: ``federated_run_id`` of a centrally trained model)
LINEAGE_TAGS = ("dataset_version", "preprocessing_hash", "git_sha", "federated_run_id", "strategy", "test_dice")
