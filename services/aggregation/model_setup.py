"""The model a federated run starts from.

It comes from ``shared.training`` (owned by the training service) so that the aggregator and every site
build the same network from the same ``TrainingConfig`` (the API validates it as that model). A run may
instead start from given weights (``initial_weights_key``: a warm start from an earlier run or a registered
model's ``weights.pt``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from services.aggregation import federated_storage as fs
from shared.storage import ObjectStore
from shared.tasks import PermanentTaskError


def initial_weights(store: ObjectStore, run: Any) -> dict[str, np.ndarray]:
    """Round 0's global weights: the given warm-start weights, or a fresh network seeded with ``run.seed``."""
    if run.initial_weights_key:
        try:
            return fs.load_weights(store, run.initial_weights_key)
        except (KeyError, ValueError) as exc:
            raise PermanentTaskError(f"initial weights {run.initial_weights_key}: {exc}") from exc
    try:
        import torch

        from shared.training import TrainingConfig, build_network
    except ImportError as exc:
        raise PermanentTaskError(
            f"no initial_weights_key given and shared.training is not available to build the network: {exc}"
        ) from exc
    config = TrainingConfig.model_validate(run.training_config)
    torch.manual_seed(run.seed)
    network = build_network(config, config.in_channels, config.num_classes)
    return fs.state_dict_to_numpy(network.state_dict())
