"""Optional differential privacy of federated rounds (DP-FedAvg, McMahan et al. 2018), as pure functions.

Each site's update Δᵢ = xᵢ - x is clipped to an L2 norm of at most C (over all floating-point entries
together), the clipped updates are averaged with their sample weights wᵢ, and Gaussian noise is added
to the mean. The sensitivity of a weighted mean to one site is C·max(wᵢ), so the noise standard
deviation is z·C·max(wᵢ) for a noise multiplier z. Every round is one Gaussian mechanism with noise
multiplier z applied to all sites (sampling rate 1); the privacy loss (ε for a given δ) over the rounds
so far comes from opacus' Rényi-DP accountant (Mironov 2017), not from a hand-written bound.

Where the clipping runs: the round task carries ``dp_clip_norm`` and each site clips its own update
before it leaves the site (shared/privacy.py), so the aggregator never receives an unbounded update.
The aggregator clips once more on receipt (a no-op for an honest site) so that the sensitivity bound, and
with it ε, holds whatever a site sends. The noise is added centrally (a trusted aggregator): it protects
the released models (site-level DP against anyone who sees the global weights).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.aggregation.strategies import StateDict, normalised_weights
from shared.privacy import clip_update


@dataclass(frozen=True)
class PrivacyConfig:
    clip_norm: float
    noise_multiplier: float
    delta: float

    def __post_init__(self) -> None:
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ValueError(f"clip_norm must be a positive number, got {self.clip_norm}")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must lie in (0, 1), got {self.delta}")


def noise_std(config: PrivacyConfig, num_samples: Sequence[float]) -> float:
    """Standard deviation of the Gaussian noise on the weighted mean: z · C · max share of one site."""
    return config.noise_multiplier * config.clip_norm * float(np.max(normalised_weights(num_samples)))


def noise_generator() -> np.random.Generator:
    """A generator seeded from the OS CSPRNG (128 bits from ``secrets``), never from the run's seed: the
    seed of the noise is neither stored nor shown anywhere, so the noise cannot be regenerated (and
    subtracted) from what a run exposes. A run repeated with the same seed gets fresh noise."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


def add_gaussian_noise(
    averaged: StateDict, std: float, rng: np.random.Generator | None = None
) -> dict[str, np.ndarray]:
    """Add N(0, std²) to every floating-point entry. ``rng`` defaults to a fresh CSPRNG-seeded generator
    (noise_generator); pass one only in tests of the calibration."""
    rng = rng if rng is not None else noise_generator()
    noisy: dict[str, np.ndarray] = {}
    for key in sorted(averaged):
        array = np.asarray(averaged[key])
        if np.issubdtype(array.dtype, np.floating) and std > 0:
            noisy[key] = (array.astype(np.float64) + rng.normal(0.0, std, size=array.shape)).astype(array.dtype)
        else:
            noisy[key] = array.copy()
    return noisy


def epsilon_after(rounds: int, noise_multiplier: float, delta: float, sample_rate: float = 1.0) -> float:
    """ε spent after ``rounds`` Gaussian mechanisms (RDP accountant of opacus); inf without noise."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=rounds, orders=orders)
    epsilon, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(epsilon)


def privatise(
    global_state: StateDict,
    updates: Sequence[StateDict],
    num_samples: Sequence[float],
    config: PrivacyConfig,
) -> tuple[dict[str, np.ndarray], list[float], float]:
    """Clip every update, take the weighted mean and add calibrated noise.

    Returns (noisy weighted mean, original update norms, noise std).
    """
    from services.aggregation.strategies import fedavg

    clipped_and_norms = [clip_update(global_state, update, config.clip_norm) for update in updates]
    averaged = fedavg(global_state, [c for c, _ in clipped_and_norms], num_samples)
    std = noise_std(config, num_samples)
    return add_gaussian_noise(averaged, std), [n for _, n in clipped_and_norms], std
