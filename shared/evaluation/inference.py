"""A trained network applied to one whole image: sliding windows, then the most likely label per voxel."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.inferers import sliding_window_inference


def predict_labels(
    network: torch.nn.Module,
    image_tensor: torch.Tensor,
    roi_size: Sequence[int],
    sw_batch_size: int = 1,
    overlap: float = 0.25,
) -> torch.Tensor:
    """Label map ``(1, X, Y, Z)`` (int64) of a channel-first image ``(C, X, Y, Z)``.

    Why sliding windows: the network is trained on patches (``roi_size``), cases are larger or of any
    shape; MONAI pads images smaller than a window and blends overlapping windows (Gaussian weights).
    The result stays channel-first so that MONAI's ``Invertd`` can take it back to the original geometry.
    """
    if image_tensor.ndim != 4:
        raise ValueError(f"image must be channel-first (C, X, Y, Z), got shape {tuple(image_tensor.shape)}")
    if len(roi_size) != 3:
        raise ValueError(f"roi_size must have 3 values, got {list(roi_size)}")
    parameter = next(network.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            logits = sliding_window_inference(
                torch.as_tensor(image_tensor, dtype=torch.float32).unsqueeze(0).to(device),
                roi_size=tuple(int(r) for r in roi_size),
                sw_batch_size=sw_batch_size,
                predictor=network,
                overlap=overlap,
                mode="gaussian",
            )
    finally:
        network.train(was_training)
    return torch.as_tensor(logits).argmax(dim=1).to(torch.int64).cpu()
