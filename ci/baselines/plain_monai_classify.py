"""The baseline ``make bench-classify`` compares against: a plain MONAI DenseNet121 classification script.

What a user writes from MONAI's 3-D classification tutorial without voxelflow: ``DenseNet121(spatial_dims=3)``
with one logit, BCE, Adam at 1e-4, random flips, batch 8, the last weights. It trains for ``seconds`` of wall
time on the cases it is given, checking the clock after every step (a DenseNet121 epoch can take longer than
the whole budget on a CPU), and the caller scores the result with the platform's metrics, at a threshold
chosen on validation the same way as the platform's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from monai.data import DataLoader, Dataset
from monai.networks.nets import DenseNet121
from monai.transforms import Compose, RandFlipd


def build_network() -> torch.nn.Module:
    return DenseNet121(spatial_dims=3, in_channels=1, out_channels=1)


def train_plain_classifier(
    train_cases: Sequence[dict[str, Any]], seconds: float, seed: int = 0
) -> tuple[torch.nn.Module, dict[str, float]]:
    """Train until ``seconds`` have passed; returns the network and (steps, samples, epochs) it managed."""
    torch.manual_seed(seed)
    augment = Compose([RandFlipd("image", prob=0.5, spatial_axis=a) for a in range(3)])
    data = [{"image": c["image"], "label": torch.as_tensor(c["label"]).float()} for c in train_cases]
    loader = DataLoader(Dataset(data, augment), batch_size=8, shuffle=True, num_workers=0)
    network = build_network()
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    started, steps, samples, epochs = time.perf_counter(), 0, 0, 0
    network.train()
    while time.perf_counter() - started < seconds:
        for batch in loader:
            optimizer.zero_grad()
            loss_fn(network(batch["image"].float()).reshape(-1), batch["label"].float()).backward()
            optimizer.step()
            steps += 1
            samples += batch["image"].shape[0]
            if time.perf_counter() - started >= seconds:
                break
        else:
            epochs += 1
    network.eval()
    return network, {"steps": steps, "samples": samples, "epochs_completed": epochs}
