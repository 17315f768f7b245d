"""Weights of a federated run as numpy arrays, for the aggregation maths.

The keys (:mod:`shared.contracts.layout`) and the codec (:mod:`shared.contracts.codec`: ``torch.save`` state
dicts read back with ``weights_only=True``, a state dict from a site is data, never code) are the contracts
the training worker shares; they are re-exported here so that aggregation code says ``fs.global_key``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from services.aggregation.strategies import ServerOptimizerState
from shared.contracts.codec import state_from_bytes, state_to_bytes
from shared.contracts.layout import (  # noqa: F401  (re-exported: the run's keys)
    SITE_PATTERN,
    attempt_id,
    config_key,
    global_key,
    parse_update_key,
    round_prefix,
    run_prefix,
    server_state_key,
    test_evaluation_key,
    update_key,
    weights_key,
)
from shared.storage import ObjectStore


def state_dict_to_numpy(state: dict[str, Any]) -> dict[str, np.ndarray]:
    import torch

    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        tensor = value.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        out[key] = tensor.numpy().copy()
    return out


def numpy_to_state_dict(state: dict[str, np.ndarray]) -> dict[str, Any]:
    import torch

    return {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in state.items()}


def save_weights(store: ObjectStore, key: str, state: dict[str, np.ndarray]) -> None:
    store.put_bytes(key, state_to_bytes(numpy_to_state_dict(state)))


def load_weights(store: ObjectStore, key: str) -> dict[str, np.ndarray]:
    """A state dict from storage as numpy arrays; ValueError when it is not a state dict of tensors."""
    try:
        loaded = state_from_bytes(store.get_bytes(key))
    except ValueError as exc:  # the codec's answer to corrupt or unsafe pickles
        raise ValueError(f"{key} is not a loadable state dict: {exc}") from exc
    if not isinstance(loaded, dict) or not loaded:
        raise ValueError(f"{key} does not hold a non-empty state dict")
    return state_dict_to_numpy(loaded)


def save_server_state(store: ObjectStore, key: str, state: ServerOptimizerState) -> None:
    store.put_bytes(
        key,
        state_to_bytes({"step": state.step, "m": numpy_to_state_dict(state.m), "v": numpy_to_state_dict(state.v)}),
    )


def load_server_state(store: ObjectStore, key: str) -> ServerOptimizerState:
    data = state_from_bytes(store.get_bytes(key))
    return ServerOptimizerState(
        step=int(data["step"]), m=state_dict_to_numpy(data["m"]), v=state_dict_to_numpy(data["v"])
    )
