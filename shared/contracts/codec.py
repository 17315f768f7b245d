"""Weights on the wire: state dicts to and from bytes.

``torch.save``/``torch.load(weights_only=True)`` is the format of every ``*.pt`` key in docs/contracts.md and
of ``model/weights.pt`` in the registry; loading with ``weights_only`` means a tampered object can fail but
never execute code. Nested dicts of tensors (checkpoints, server optimiser state) use the same codec.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any


def state_to_bytes(state: Mapping[str, Any]) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    return buffer.getvalue()


def state_from_bytes(data: bytes) -> dict[str, Any]:
    """The dict in ``data`` (tensors on the CPU); ValueError when it is not a ``torch.save`` dict of tensors."""
    import torch

    try:
        loaded = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:
        raise ValueError(f"not a torch.save state dict: {type(exc).__name__}: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ValueError(f"expected a dict, got {type(loaded).__name__}")
    return loaded
