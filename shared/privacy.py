"""Update clipping for differentially private federated rounds (DP-FedAvg, McMahan et al. 2018): the
maths both sides of a round share, as pure functions over numpy state dicts.

A site clips its update Δ = local - global to an L2 norm of at most C over all floating-point entries
together, before the weights leave the site; the aggregator clips again on receipt (a no-op for an
honest site), so the guarantee holds whatever a site sends, then averages and adds calibrated noise
(services/aggregation/privacy.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

StateArrays = Mapping[str, np.ndarray]


def _float_keys(state: StateArrays) -> list[str]:
    return [key for key, array in state.items() if np.issubdtype(np.asarray(array).dtype, np.floating)]


def update_norm(global_state: StateArrays, update: StateArrays) -> float:
    """L2 norm of the update Δ = update - global over all floating-point entries."""
    total = 0.0
    for key in _float_keys(global_state):
        diff = np.asarray(update[key], dtype=np.float64) - np.asarray(global_state[key], dtype=np.float64)
        total += float(np.sum(diff * diff))
    return math.sqrt(total)


def clip_update(
    global_state: StateArrays, update: StateArrays, clip_norm: float
) -> tuple[dict[str, np.ndarray], float]:
    """Return global + Δ·min(1, C/‖Δ‖) and the original norm ‖Δ‖. Non-float entries pass unchanged."""
    if not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ValueError(f"clip_norm must be a positive number, got {clip_norm}")
    norm = update_norm(global_state, update)
    scale = 1.0 if norm <= clip_norm else clip_norm / norm
    clipped: dict[str, np.ndarray] = {}
    for key, value in update.items():
        array = np.asarray(value)
        if np.issubdtype(array.dtype, np.floating):
            base = np.asarray(global_state[key], dtype=np.float64)
            clipped[key] = (base + scale * (array.astype(np.float64) - base)).astype(array.dtype)
        else:
            clipped[key] = array.copy()
    return clipped, norm
