"""The baseline ``make bench-train`` compares against: what a user writes without voxelflow, in plain MONAI.

A deliberately ordinary script (the one the issue measured): MONAI UNet 16-128 with 2 residual units,
whole hippocampus crops padded to 48x64x48, random flips, DiceCE, AdamW 2e-3 at a constant rate, the
last weights. It trains on the cases it is given for ``seconds`` of wall time and reports the validation
Dice after every epoch; the caller scores the final weights on the test cases with the platform's metric.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.data import DataLoader, Dataset
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.transforms import Compose, RandFlipd, SpatialPadd

PAD = (48, 64, 48)


def build_network() -> torch.nn.Module:
    return UNet(3, 1, 3, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2)


def train_plain(
    train_cases: Sequence[dict[str, Any]],
    seconds: float,
    validate: Callable[[torch.nn.Module], float],
    on_epoch: Callable[[int, float, float], None],
    seed: int = 0,
) -> torch.nn.Module:
    """Train until ``seconds`` have passed (finishing the epoch); ``on_epoch(epoch, elapsed_s, val_dice)``.

    ``elapsed_s`` counts validation too, as the platform's epoch times do: both arms validate every epoch."""
    torch.manual_seed(seed)
    keys = ["image", "label"]
    augment = Compose([SpatialPadd(keys, PAD), *[RandFlipd(keys, prob=0.5, spatial_axis=a) for a in range(3)]])
    loader = DataLoader(Dataset(list(train_cases), augment), batch_size=2, shuffle=True, num_workers=0)
    network = build_network()
    optimizer = torch.optim.AdamW(network.parameters(), lr=2e-3, weight_decay=1e-5)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    started, epoch = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        network.train()
        for batch in loader:
            optimizer.zero_grad()
            loss_fn(network(batch["image"].float()), batch["label"].long()).backward()
            optimizer.step()
        epoch += 1
        network.eval()
        dice = validate(network)
        on_epoch(epoch, time.perf_counter() - started, dice)
    return network
