"""The model a federated run starts from.

It comes from ``shared.training`` (owned by the training service) so that the aggregator and every site
build the same network from the same ``TrainingConfig`` (the API validates it as that model). A run may
instead start from given weights (``initial_weights_key``: a warm start from an earlier run or a registered
model's ``weights.pt``).

:func:`resolve_training_config` is where a run's ``TrainingConfig`` is decided, once, when the run is created:
the fields the request leaves unset come from the dataset version's plan (its stored fingerprint).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from services.aggregation import federated_storage as fs
from shared.storage import ObjectStore
from shared.tasks import PermanentTaskError


def resolve_training_config(
    store: ObjectStore, dataset_version: str, config: Any, use_plan: bool
) -> tuple[Any, list[str]]:
    """The run's config (a ``TrainingConfig`` as the request gave it, so its set fields are known) with the
    version's plan applied unless ``use_plan`` is false, and the fields taken from the plan. Without
    ``shared.training`` (an aggregator image without torch) or a stored fingerprint, the config is as given."""
    if not use_plan:
        return config, []
    try:
        from shared.training.plans import plan_for_version
    except ImportError:
        return config, []
    return plan_for_version(store, dataset_version, config)


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


def local_norm_keys(run: Any) -> frozenset[str]:
    """FedBN's local entries: the normalisation layers of the run's network (empty unless ``local_norm_layers``)."""
    if not run.local_norm_layers:
        return frozenset()
    from shared.training import TrainingConfig
    from shared.training.federated import config_norm_keys

    return config_norm_keys(TrainingConfig.model_validate(run.training_config))


def check_federated_training(config: dict[str, Any], rounds: int, local_epochs: int, local_norm_layers: bool) -> None:
    """ValueError (the API's 422) for a run whose schedule or FedBN cannot work: a schedule that does not
    evaluate over the whole run (rounds x local_epochs epochs; a warm-up longer than the run is shortened,
    not refused), or FedBN on a network without normalisation parameters."""
    try:
        from shared.training import TrainingConfig
        from shared.training.federated import config_norm_keys
        from shared.training.schedule import lr_factor
    except ImportError:
        return  # the site validates it
    training = TrainingConfig.model_validate(config)
    lr_factor(training.schedule, 0, rounds * local_epochs, base_lr=training.optimizer.lr)
    if local_norm_layers and not config_norm_keys(training):
        raise ValueError(
            f"local_norm_layers: the configured {training.network.name} has no normalisation parameters or "
            "statistics (e.g. instance norm without affine): FedBN would change nothing; use norm 'batch'"
        )
