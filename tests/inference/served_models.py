"""Test-only served models: a tiny MONAI UNet run in PyTorch behind the real ``mr_hippocampus`` spec's
inference transforms (shared.preprocessing).

The API, job, PACS and back-pressure tests use them where a test must control load and predict delays
(a slow model to fill the queue) or does not need a registry; the service code under test only sees
:class:`ServedModel`, exactly as with the registry-loaded ones (test_service_registry.py serves those).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

from services.inference.model_server import ServedModel
from shared.preprocessing import build_transforms, load_spec

LABELS = {0: "background", 1: "anterior", 2: "posterior"}
ROI = (32, 32, 32)


SPEC = load_spec("mr_hippocampus")


def unet_model(version: str, seed: int = 0, delay: float = 0.0) -> ServedModel:
    torch.manual_seed(seed)
    net = UNet(3, 1, 3, channels=(4, 8), strides=(2,), num_res_units=0).eval()
    closed = threading.Event()

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        if closed.is_set():
            raise RuntimeError(f"version {version} used after close")
        if delay:
            time.sleep(delay)
        return sliding_window_inference(batch, ROI, 2, net, overlap=0.25)

    model = ServedModel(
        name="hippocampus-test",
        version=version,
        registry_uri=f"models:/hippocampus-test/{version}",
        spec=SPEC.to_dict(),
        labels=LABELS,
        transforms=build_transforms(SPEC, "inference", load=False),
        predictor=predictor,
        roi_size=ROI,
        on_close=closed.set,
    )
    model.closed = closed  # type: ignore[attr-defined]
    return model


def ball_model(version: str, seed: int = 0, delay: float = 0.0) -> ServedModel:
    """A "model" whose output is known without running one: label 1 ("anterior") in a ball at the centre of
    the network's input, label 2 ("posterior") in a smaller ball beside it, background elsewhere. The
    viewer test needs a mask with a shape a person can check in a screenshot, and slices it leaves empty."""
    model = unet_model(version, seed, delay)

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        spatial = batch.shape[2:]
        grid = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in spatial), indexing="ij")
        centre = [n / 2 for n in spatial]
        radius = min(spatial) / 5
        beside = [centre[0] + 1.6 * radius, *centre[1:]]
        inside = [
            sum((g - c) ** 2 for g, c in zip(grid, at, strict=True)) <= r**2
            for at, r in ((centre, radius), (beside, 0.6 * radius))
        ]
        logits = torch.zeros((batch.shape[0], 3, *spatial))
        logits[:, 0] = 1.0
        logits[:, 1][:, inside[0]] = 2.0
        logits[:, 2][:, inside[1] & ~inside[0]] = 2.0
        return logits

    model.predictor = predictor
    return model


class MovableAliases:
    """A model source whose aliases a test moves, loading real (tiny) UNets with a load delay."""

    def __init__(
        self,
        aliases: dict[str, str],
        load_delay: float = 0.0,
        predict_delay: float = 0.0,
        model: Callable[..., ServedModel] = unet_model,
    ):
        self.aliases = dict(aliases)
        self.model = model
        self.load_delay = load_delay
        self.predict_delay = predict_delay
        self.loaded: list[ServedModel] = []

    def resolve(self, alias: str) -> str | None:
        return self.aliases.get(alias)

    def load(self, version: str) -> ServedModel:
        time.sleep(self.load_delay)
        model = self.model(version, seed=int(version), delay=self.predict_delay)
        self.loaded.append(model)
        return model
