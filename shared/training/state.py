"""Weights on the wire: state dicts to and from bytes, and the FedAvg weighted mean (used by the benchmark).

The codec itself is the contract :mod:`shared.contracts.codec` (re-exported here for training code).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from shared.contracts.codec import state_from_bytes, state_to_bytes

__all__ = ["state_from_bytes", "state_to_bytes", "weighted_average"]


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict:
    """FedAvg: the sample-count-weighted mean of floating tensors; integer buffers come from the first."""
    if not states or len(states) != len(weights):
        raise ValueError("need one weight per state dict and at least one state dict")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            acc = torch.zeros_like(first, dtype=torch.float64)
            for state, weight in zip(states, weights, strict=True):
                acc += state[key].double() * (weight / total)
            out[key] = acc.to(first.dtype)
        else:
            out[key] = first.clone()
    return out
