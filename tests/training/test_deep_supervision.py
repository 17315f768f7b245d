"""Deep supervision: a DynUNet's lower heads join the training loss (nnU-Net weights, label downsampled to
each head), while validation, evaluation, serving and the ONNX export see the main output only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss

from shared.evaluation.held_out import network_from_state
from shared.inference import OnnxRuntimeBackend, SlidingWindowPredictor, TorchModuleBackend
from shared.training import TrainingConfig, build_network, train_local
from shared.training.local import nnunet_supervision_weights, supervised_loss, supervision_outputs

ROI = (32, 32, 32)


def tiny_dynunet_config(heads: int = 2, **overrides: Any) -> TrainingConfig:
    data: dict[str, Any] = {
        "network": {"name": "dynunet", "args": {"filters": [4, 8, 16, 32]}},
        "deep_supervision": heads,
        "patch": {"sampler": "pos_neg", "size": list(ROI), "num_samples": 1},
        "validation": {"roi_size": list(ROI)},
        "epochs": 1,
        "batch_size": 2,
        **overrides,
    }
    return TrainingConfig.model_validate(data)


def test_nnunet_weights_halve_per_head_and_sum_to_one() -> None:
    assert nnunet_supervision_weights(2) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert nnunet_supervision_weights(0) == [1.0]


def test_deep_supervision_is_refused_for_a_network_without_heads() -> None:
    with pytest.raises(ValueError, match="deep_supervision needs network dynunet"):
        TrainingConfig.model_validate({"network": {"name": "unet"}, "deep_supervision": 1})
    with pytest.raises(ValueError, match="set deep supervision once"):
        TrainingConfig.model_validate(
            {"network": {"name": "dynunet", "args": {"deep_supr_num": 1}}, "deep_supervision": 1}
        )


def test_the_loss_covers_every_head_at_its_own_size() -> None:
    config = tiny_dynunet_config(heads=2)
    torch.manual_seed(0)
    network = build_network(config, 1, 3).train()
    image = torch.randn(2, 1, *ROI)
    label = torch.randint(0, 3, (2, 1, *ROI))
    output = network(image)
    assert output.shape == (2, 3, 3, *ROI)  # DynUNet's training output: main + 2 upsampled heads, stacked
    outputs = supervision_outputs(network, output)
    assert outputs is not None
    assert [tuple(o.shape[2:]) for o in outputs] == [ROI, (16, 16, 16), (8, 8, 8)]

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    deep = supervised_loss(loss_fn, outputs, label)
    main_only = supervised_loss(loss_fn, outputs[0], label)
    assert not torch.isclose(deep, main_only)
    # the same sum by hand: each head against the label downsampled by nearest-exact
    weights = nnunet_supervision_weights(2)
    by_hand = sum(
        w * loss_fn(o, torch.nn.functional.interpolate(label.float(), size=o.shape[2:], mode="nearest-exact"))
        for w, o in zip(weights, outputs, strict=True)
    )
    assert deep.item() == pytest.approx(float(by_hand), rel=1e-5)
    deep.backward()  # every head gets a gradient from the loss
    for head in network.deep_supervision_heads:
        assert head.conv.conv.weight.grad is not None and head.conv.conv.weight.grad.abs().sum() > 0

    network.eval()
    assert supervision_outputs(network, output) is None
    with torch.no_grad():
        assert network(image).shape == (2, 3, *ROI)  # eval mode: the main output only


def test_a_deeply_supervised_dynunet_trains_and_serves_plain_predictions(
    hippo_cases: list[dict], tmp_path: Path
) -> None:
    config = tiny_dynunet_config(heads=2)
    result = train_local(config, hippo_cases[:2], hippo_cases[6:7], None, epochs=1)
    assert result.history[0].val_dice is not None  # validation ran on the main output
    plain = train_local(tiny_dynunet_config(heads=0), hippo_cases[:2], [], None, epochs=1)
    assert result.history[0].train_loss != plain.history[0].train_loss

    network = network_from_state(config, result.state_dict)  # what evaluation and serving build
    assert any(k.startswith("deep_supervision_heads") for k in result.state_dict)
    image = hippo_cases[6]["image"]
    torch_scores = SlidingWindowPredictor(TorchModuleBackend(network), ROI)(image)
    assert torch_scores.shape == (1, 3, *image.shape[1:])

    from services.inference.export import export_onnx

    onnx_path = export_onnx(network, 1, ROI, tmp_path / "model.onnx")
    backend = OnnxRuntimeBackend()
    backend.load("dynunet-ds", 1, onnx_path)
    onnx_scores = SlidingWindowPredictor(backend, ROI)(image)
    assert onnx_scores.shape == torch_scores.shape
    np.testing.assert_allclose(onnx_scores.numpy(), torch_scores.numpy(), atol=1e-3)
