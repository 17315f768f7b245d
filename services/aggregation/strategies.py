"""Server-side aggregation of federated updates, as pure functions on state dicts of numpy arrays.

Why pure functions: the aggregator must produce bit-identical weights when it resumes a round after a
crash, and the maths must be testable on its own (tests/aggregation/test_strategies.py checks the
invariants with hypothesis). Nothing here touches storage, the database or torch.

Strategies (``Strategy``):

- ``fedavg`` (McMahan et al. 2017): the new global model is the sample-weighted mean of the site models.
- ``fedprox`` (Li et al. 2020): the server step is FedAvg; the proximal term ``mu`` acts only in the
  clients' local objective (it travels in ``TrainingRoundTask.fedprox_mu``).
- ``fedadam`` / ``fedyogi`` (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2): the
  sample-weighted mean of the client deltas is a pseudo-gradient that an Adam/Yogi server optimiser
  applies to the global model. Its moments (:class:`ServerOptimizerState`) persist between rounds.

Only floating-point entries are averaged. Integer buffers (BatchNorm's ``num_batches_tracked``) are
counters, not parameters; they take the largest value any site reports.

FedBN (Li et al. 2021, ``local_keys``): the normalisation layers are not part of the federated model. The
server step leaves them out (no pseudo-gradient, no moments); each site trains with its own. The global
model still needs some for evaluation and registration: it takes their plain sample-weighted mean.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

StateDict = Mapping[str, np.ndarray]


class Strategy(enum.StrEnum):
    FEDAVG = "fedavg"
    FEDPROX = "fedprox"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"


@dataclass(frozen=True)
class ServerOptimizerConfig:
    """Hyper-parameters of the adaptive server optimisers (defaults from Reddi et al. 2021, Table 8 range)."""

    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"server learning rate must be > 0, got {self.lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"betas must lie in [0, 1), got {self.beta1}, {self.beta2}")
        if not self.tau > 0:
            raise ValueError(f"tau (adaptivity) must be > 0, got {self.tau}")


@dataclass
class ServerOptimizerState:
    """First and second moments of the server optimiser, one array per floating-point entry."""

    step: int = 0
    m: dict[str, np.ndarray] = field(default_factory=dict)
    v: dict[str, np.ndarray] = field(default_factory=dict)


def _is_float(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.floating)


def check_compatible(reference: StateDict, updates: Sequence[StateDict]) -> None:
    """Every update must have exactly the reference's keys, shapes and kinds (float vs integer)."""
    ref_keys = set(reference)
    for index, update in enumerate(updates):
        keys = set(update)
        if keys != ref_keys:
            missing = sorted(ref_keys - keys)[:5]
            extra = sorted(keys - ref_keys)[:5]
            raise ValueError(
                f"update {index} has other entries than the global model: missing {missing}, extra {extra}"
            )
        for key, array in update.items():
            if array.shape != reference[key].shape:
                raise ValueError(
                    f"update {index}: {key!r} has shape {array.shape}, the global model {reference[key].shape}"
                )
            if _is_float(array) != _is_float(reference[key]):
                raise ValueError(f"update {index}: {key!r} is {array.dtype}, the global model {reference[key].dtype}")
            if _is_float(array) and not np.all(np.isfinite(array)):
                raise ValueError(f"update {index}: {key!r} contains NaN or infinite values")


def normalised_weights(num_samples: Sequence[float]) -> np.ndarray:
    """Sample counts → weights that sum to 1. Counts must be positive and finite."""
    counts = np.asarray(num_samples, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError("at least one update is needed to aggregate")
    if not np.all(np.isfinite(counts)) or np.any(counts <= 0):
        raise ValueError(f"sample counts must be positive and finite, got {list(num_samples)}")
    return counts / counts.sum()


def weighted_average(updates: Sequence[StateDict], num_samples: Sequence[float]) -> dict[str, np.ndarray]:
    """Sample-weighted mean of state dicts (float entries; integer buffers take the maximum).

    Accumulates in float64 in the given order and casts back to each entry's dtype, so the result is
    deterministic for a given order (callers sort updates by site).
    """
    if len(updates) != len(num_samples):
        raise ValueError(f"{len(updates)} updates but {len(num_samples)} sample counts")
    weights = normalised_weights(num_samples)
    check_compatible(updates[0], updates[1:])
    result: dict[str, np.ndarray] = {}
    for key, first in updates[0].items():
        if _is_float(first):
            total = np.zeros(first.shape, dtype=np.float64)
            for weight, update in zip(weights, updates, strict=True):
                total += weight * np.asarray(update[key], dtype=np.float64)
            result[key] = total.astype(first.dtype)
        else:
            result[key] = np.max(np.stack([np.asarray(u[key]) for u in updates]), axis=0).astype(first.dtype)
    return result


def fedavg(
    global_state: StateDict, updates: Sequence[StateDict], num_samples: Sequence[float]
) -> dict[str, np.ndarray]:
    """FedAvg server step; FedProx uses the same one (its ``mu`` is a client-side term)."""
    check_compatible(global_state, updates)
    return weighted_average(updates, num_samples)


def pseudo_gradient(global_state: StateDict, averaged: StateDict) -> dict[str, np.ndarray]:
    """Δ = mean(x_i) - x (float entries only, float64): the direction the clients moved the model."""
    return {
        key: np.asarray(averaged[key], dtype=np.float64) - np.asarray(array, dtype=np.float64)
        for key, array in global_state.items()
        if _is_float(array)
    }


def adaptive_server_step(
    global_state: StateDict,
    averaged: StateDict,
    state: ServerOptimizerState,
    config: ServerOptimizerConfig,
    variant: Strategy,
    local_keys: frozenset[str] = frozenset(),
) -> tuple[dict[str, np.ndarray], ServerOptimizerState]:
    """One FedAdam or FedYogi step (Reddi et al. 2021, Algorithm 2; no bias correction, as in the paper).

    m ← β1·m + (1-β1)·Δ;  Adam: v ← β2·v + (1-β2)·Δ²;  Yogi: v ← v - (1-β2)·Δ²·sign(v - Δ²);
    x ← x + η·m / (√v + τ).  The second moment starts at τ² (the paper's v₋₁ ≥ τ²). Returns new arrays
    and a new state; the inputs are not modified. Entries in ``local_keys`` (FedBN) take the mean as it is.
    """
    if variant not in (Strategy.FEDADAM, Strategy.FEDYOGI):
        raise ValueError(f"{variant} has no adaptive server optimiser")
    delta = pseudo_gradient(global_state, averaged)
    new_m: dict[str, np.ndarray] = {}
    new_v: dict[str, np.ndarray] = {}
    new_global: dict[str, np.ndarray] = {}
    for key, array in global_state.items():
        if key not in delta or key in local_keys:
            new_global[key] = np.asarray(averaged[key]).astype(array.dtype)
            continue
        d = delta[key]
        m_prev = state.m.get(key, np.zeros_like(d))
        v_prev = state.v.get(key, np.full_like(d, config.tau**2))
        m = config.beta1 * m_prev + (1 - config.beta1) * d
        if variant is Strategy.FEDADAM:
            v = config.beta2 * v_prev + (1 - config.beta2) * d * d
        else:
            v = v_prev - (1 - config.beta2) * d * d * np.sign(v_prev - d * d)
        new_m[key], new_v[key] = m, v
        x = np.asarray(array, dtype=np.float64) + config.lr * m / (np.sqrt(v) + config.tau)
        new_global[key] = x.astype(array.dtype)
    return new_global, ServerOptimizerState(step=state.step + 1, m=new_m, v=new_v)


def server_update(
    strategy: Strategy,
    global_state: StateDict,
    averaged: StateDict,
    server_state: ServerOptimizerState | None = None,
    server_config: ServerOptimizerConfig | None = None,
    local_keys: frozenset[str] = frozenset(),
) -> tuple[dict[str, np.ndarray], ServerOptimizerState | None]:
    """Apply the server step of ``strategy`` to the (possibly privatised) weighted mean of the updates;
    ``local_keys`` (FedBN's normalisation layers) keep the mean, outside any server optimiser."""
    if strategy in (Strategy.FEDAVG, Strategy.FEDPROX):
        return {key: np.asarray(value).copy() for key, value in averaged.items()}, None
    return adaptive_server_step(
        global_state,
        averaged,
        server_state or ServerOptimizerState(),
        server_config or ServerOptimizerConfig(),
        strategy,
        local_keys,
    )


def aggregate(
    strategy: Strategy,
    global_state: StateDict,
    updates: Sequence[StateDict],
    num_samples: Sequence[float],
    server_state: ServerOptimizerState | None = None,
    server_config: ServerOptimizerConfig | None = None,
    local_keys: frozenset[str] = frozenset(),
) -> tuple[dict[str, np.ndarray], ServerOptimizerState | None]:
    """The new global model after one round under ``strategy`` (and the server optimiser state, if any)."""
    averaged = fedavg(global_state, updates, num_samples)
    return server_update(strategy, global_state, averaged, server_state, server_config, local_keys)
