"""Test-only served models: a tiny MONAI UNet run in PyTorch behind the real ``mr_hippocampus`` spec's
inference transforms (shared.preprocessing).

The API, job, PACS and back-pressure tests use them where a test must control load and predict delays
(a slow model to fill the queue) or does not need a registry; the service code under test only sees
:class:`ServedModel`, exactly as with the registry-loaded ones (test_service_registry.py serves those).
"""

from __future__ import annotations

import threading
import time

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


class MovableAliases:
    """A model source whose aliases a test moves, loading real (tiny) UNets with a load delay."""

    def __init__(self, aliases: dict[str, str], load_delay: float = 0.0, predict_delay: float = 0.0):
        self.aliases = dict(aliases)
        self.load_delay = load_delay
        self.predict_delay = predict_delay
        self.loaded: list[ServedModel] = []

    def resolve(self, alias: str) -> str | None:
        return self.aliases.get(alias)

    def load(self, version: str) -> ServedModel:
        time.sleep(self.load_delay)
        model = unet_model(version, seed=int(version), delay=self.predict_delay)
        self.loaded.append(model)
        return model
