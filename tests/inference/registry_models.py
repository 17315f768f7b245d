"""Tiny models registered in the session's real MLflow through shared.registry, as training would register them.

The network is a shared.training UNet (channels 4, 8, 16) rebuilt by ``load_model`` from its stored training
config; random weights with a fixed seed (a different seed is a genuinely different model, which the swap and
canary tests rely on). The preprocessing is the real ``mr_hippocampus`` spec, stored with the model.
"""

from __future__ import annotations

import uuid
from typing import Any

import torch
import yaml

from shared.preprocessing import load_spec
from shared.registry import log_training_run, register_model_version
from shared.training import TrainingConfig, build_network

LABELS = {0: "background", 1: "anterior", 2: "posterior"}
SPEC = load_spec("mr_hippocampus")
TRAINING_CONFIG = {
    "network": {"name": "unet", "args": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}},
    "num_classes": 3,
    "in_channels": 1,
    "validation": {"roi_size": [32, 32, 32]},  # the window the export takes
}


def unique_model_name(prefix: str = "hippo") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def register_tiny_model(client: Any, name: str, seed: int, alias: str | None = None) -> int:
    """Log a freshly initialised tiny UNet as a training run and register it; returns the version number."""
    torch.manual_seed(seed)
    config_yaml = yaml.safe_dump(TRAINING_CONFIG)
    network = build_network(TrainingConfig.from_yaml(config_yaml), 1, len(LABELS))
    run_id = log_training_run(
        experiment=f"inference-tests-{name}",
        state_dict=network.state_dict(),
        training_config_yaml=config_yaml,
        preprocessing_spec=SPEC.to_dict(),
        preprocessing_hash=SPEC.hash,
        labels=LABELS,
        dataset_version="ds-00000000deadbeef",  # not in storage: exports name their cases explicitly
        run_name=f"{name}-seed{seed}",
        client=client,
    )
    return register_model_version(run_id, name, alias=alias, client=client)
