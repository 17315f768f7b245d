"""Which entries of a network's state dict are normalisation layers (FedBN, Li et al. 2021).

Why here: under ``local_norm_layers`` the aggregator leaves these entries out of the server optimiser's step
and every site replaces them with its own before training; both must name the same entries, and both build
the network from the run's ``TrainingConfig``, so the set is decided once, by the module types, not by
guessing from key names.
"""

from __future__ import annotations

import torch

from shared.training.config import TrainingConfig
from shared.training.networks import build_network

#: module types whose parameters and buffers are per-site statistics or affine maps of them
NORM_TYPES: tuple[type[torch.nn.Module], ...] = (
    torch.nn.modules.batchnorm._NormBase,  # BatchNorm*d, InstanceNorm*d (with affine / running stats)
    torch.nn.GroupNorm,
    torch.nn.LayerNorm,
)


def norm_state_keys(network: torch.nn.Module) -> frozenset[str]:
    """The state-dict keys (parameters and persistent buffers) of every normalisation layer of ``network``."""
    state_keys = set(network.state_dict())
    keys: set[str] = set()
    for name, module in network.named_modules():
        if not isinstance(module, NORM_TYPES):
            continue
        prefix = f"{name}." if name else ""
        entries = [n for n, _ in module.named_parameters(recurse=False)] + [
            n for n, _ in module.named_buffers(recurse=False)
        ]
        keys.update(prefix + n for n in entries if prefix + n in state_keys)
    return frozenset(keys)


def config_norm_keys(config: TrainingConfig) -> frozenset[str]:
    """:func:`norm_state_keys` of the network ``config`` builds (no weights needed: only the structure)."""
    return norm_state_keys(build_network(config, config.in_channels, config.num_classes))
