"""Test-time mirroring in the shared predictor and the largest-component choice made on validation cases.

Pure CPU tests with tiny deterministic networks: what is checked is the arithmetic of the averaging over
flips and the per-label decision, not a trained model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.evaluation.held_out import choose_largest_component_labels, evaluate_network
from shared.inference import SlidingWindowPredictor, TorchModuleBackend, segment_array

LABELS = {0: "background", 1: "a", 2: "b"}


class PositionNet(torch.nn.Module):
    """Logits that depend on position (not flip-invariant), so mirroring visibly changes the output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(-2.0, 2.0, x.shape[2]).view(1, 1, -1, 1, 1).expand_as(x)
        return torch.cat([x, x * ramp, -ramp + 0 * x], dim=1)


def test_mirroring_averages_the_softmax_over_every_flip() -> None:
    volume = torch.rand(1, 8, 6, 4)
    network = PositionNet().eval()
    mirrored = SlidingWindowPredictor(TorchModuleBackend(network), (8, 6, 4), mirror_axes=(0, 2))(volume)
    batch = volume[None]
    expected = torch.softmax(network(batch), 1)
    for dims in [(2,), (4,), (2, 4)]:  # axes 0 and 2 of the volume are dims 2 and 4 of the batch
        expected = expected + torch.softmax(network(batch.flip(dims)), 1).flip(dims)
    expected = expected / 4
    assert torch.allclose(mirrored, expected, atol=1e-6)
    plain = SlidingWindowPredictor(TorchModuleBackend(network), (8, 6, 4))(volume)
    assert not torch.allclose(torch.softmax(plain, 1), mirrored, atol=1e-3)  # mirroring did something


@pytest.mark.parametrize("axes", [(3,), (0, 0), (-1,)])
def test_mirror_axes_must_be_distinct_spatial_axes(axes: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="mirror_axes"):
        SlidingWindowPredictor(TorchModuleBackend(PositionNet()), (8, 6, 4), mirror_axes=axes)


class FixedNet(torch.nn.Module):
    """Returns the one-hot logits of a fixed label map, whatever the input (a stand-in trained model)."""

    def __init__(self, labels: np.ndarray) -> None:
        super().__init__()
        onehot = torch.nn.functional.one_hot(torch.as_tensor(labels, dtype=torch.int64), 3).permute(3, 0, 1, 2)
        self.register_buffer("logits", onehot.float()[None] * 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1, -1, -1, -1)


def _case(truth: np.ndarray, name: str) -> dict:
    return {"case_id": name, "image": torch.zeros(1, *truth.shape), "label": torch.as_tensor(truth[None])}


def test_largest_component_is_chosen_only_for_the_label_it_helps() -> None:
    truth = np.zeros((12, 12, 12), np.uint8)
    truth[2:6, 2:6, 2:6] = 1
    truth[7:11, 7:11, 7:11] = 2
    predicted = truth.copy()
    predicted[9:11, 0:2, 0:2] = 1  # a spurious island of label 1: filtering it helps
    # label 2 is predicted exactly: filtering cannot help, so it must not be chosen
    network = FixedNet(predicted)
    chosen, evidence = choose_largest_component_labels(network, [_case(truth, "c1")], LABELS, (12, 12, 12))
    assert chosen == [1]
    assert evidence["a"]["with"] > evidence["a"]["without"]
    assert evidence["b"]["with"] == evidence["b"]["without"] == pytest.approx(1.0)
    filtered = evaluate_network(network, [_case(truth, "c1")], LABELS, (12, 12, 12), largest_component_labels=chosen)
    assert {r["label_name"]: r["dice"] for r in filtered}["a"] == pytest.approx(1.0)


def test_segment_array_filters_only_the_labels_named() -> None:
    mask = np.zeros((10, 10, 10), np.uint8)
    mask[1:4, 1:4, 1:4] = 1
    mask[7:9, 7:9, 7:9] = 1  # a second component of label 1
    mask[5:7, 0:2, 0:2] = 2
    mask[0:1, 8:10, 8:10] = 2  # a second component of label 2
    from monai.transforms import Compose, EnsureChannelFirstd

    transforms = Compose([EnsureChannelFirstd(keys="image")])
    predict = TorchModuleBackend(FixedNet(mask))
    predictor = SlidingWindowPredictor(predict, (10, 10, 10))
    out = segment_array(
        predictor, transforms, LABELS, np.zeros((10, 10, 10), np.float32), np.eye(4), largest_component=[2]
    ).mask
    assert (out == 1).sum() == (mask == 1).sum()  # label 1 untouched
    assert (out == 2).sum() == 8  # label 2 kept its larger component only
