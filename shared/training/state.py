"""Weights on the wire: state dicts to and from bytes, and the FedAvg weighted mean (used by the benchmark).

``torch.save``/``torch.load(weights_only=True)`` is the format of every ``*.pt`` key in docs/contracts.md;
loading with ``weights_only`` means a tampered object can fail but never execute code.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import torch


def state_to_bytes(state: Mapping[str, object]) -> bytes:
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    return buffer.getvalue()


def state_from_bytes(data: bytes) -> dict:
    try:
        loaded = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:
        raise ValueError(f"not a torch.save state dict: {type(exc).__name__}: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ValueError(f"expected a dict, got {type(loaded).__name__}")
    return loaded


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
