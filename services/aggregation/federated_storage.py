"""Where a federated run keeps its files in object storage (docs/contracts.md) and how weights are (de)serialised.

Weights travel as ``torch.save`` state dicts (read back with ``weights_only=True``: a state dict from a
site is data, never code); the aggregation maths works on numpy arrays, so this module converts.
"""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np

from services.aggregation.strategies import ServerOptimizerState
from shared.storage import ObjectStore

SITE_PATTERN = r"[a-z0-9](?:[a-z0-9-]{0,62})"


def run_prefix(run_id: str) -> str:
    return f"federated/{run_id}/"


def config_key(run_id: str) -> str:
    return f"federated/{run_id}/training-config.yaml"


def round_prefix(run_id: str, round_index: int) -> str:
    return f"federated/{run_id}/round-{round_index:04d}/"


def global_key(run_id: str, round_index: int) -> str:
    """The weights round ``round_index`` starts from; for ``round_index == rounds`` the final model."""
    return f"{round_prefix(run_id, round_index)}global.pt"


def test_evaluation_key(run_id: str) -> str:
    """Per-case records of the final model on holdout.test (written once; a resumed finish reuses them)."""
    return f"federated/{run_id}/test-evaluation.json"


def server_state_key(run_id: str, round_index: int) -> str:
    """Server optimiser moments after round ``round_index - 1`` (FedAdam/FedYogi only)."""
    return f"{round_prefix(run_id, round_index)}server-state.pt"


def attempt_id(run_id: str, round_index: int, site: str) -> str:
    """The idempotency key of one site's round task; also its Celery task id."""
    return f"{run_id}-r{round_index}-{site}"


def update_key(run_id: str, round_index: int, site: str, attempt: str) -> str:
    return f"{round_prefix(run_id, round_index)}{site}/{attempt}/update.json"


def weights_key(run_id: str, round_index: int, site: str, attempt: str) -> str:
    return f"{round_prefix(run_id, round_index)}{site}/{attempt}/weights.pt"


def parse_update_key(run_id: str, key: str) -> tuple[int, str, str] | None:
    """``federated/{run}/round-{r}/{site}/{attempt}/update.json`` → (r, site, attempt); None otherwise."""
    match = re.fullmatch(rf"federated/{re.escape(run_id)}/round-(\d{{4,}})/({SITE_PATTERN})/([^/]+)/update\.json", key)
    if match is None:
        return None
    return int(match.group(1)), match.group(2), match.group(3)


def _to_bytes(obj: Any) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes) -> Any:
    import torch

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


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
    store.put_bytes(key, _to_bytes(numpy_to_state_dict(state)))


def load_weights(store: ObjectStore, key: str) -> dict[str, np.ndarray]:
    """A state dict from storage as numpy arrays; ValueError when it is not a state dict of tensors."""
    try:
        loaded = _from_bytes(store.get_bytes(key))
    except (RuntimeError, EOFError, ValueError) as exc:  # torch raises these for corrupt or unsafe pickles
        raise ValueError(f"{key} is not a loadable state dict: {exc}") from exc
    if not isinstance(loaded, dict) or not loaded:
        raise ValueError(f"{key} does not hold a non-empty state dict")
    return state_dict_to_numpy(loaded)


def save_server_state(store: ObjectStore, key: str, state: ServerOptimizerState) -> None:
    store.put_bytes(
        key,
        _to_bytes({"step": state.step, "m": numpy_to_state_dict(state.m), "v": numpy_to_state_dict(state.v)}),
    )


def load_server_state(store: ObjectStore, key: str) -> ServerOptimizerState:
    data = _from_bytes(store.get_bytes(key))
    return ServerOptimizerState(
        step=int(data["step"]), m=state_dict_to_numpy(data["m"]), v=state_dict_to_numpy(data["v"])
    )
