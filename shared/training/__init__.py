"""Training shared by the training-worker (federated rounds) and the centralised baseline."""

from shared.training.config import TrainingConfig, load_config
from shared.training.local import EpochRecord, LocalResult, TrainingDiverged, evaluate_dice, train_local
from shared.training.networks import build_network

__all__ = [
    "EpochRecord",
    "LocalResult",
    "TrainingConfig",
    "TrainingDiverged",
    "build_network",
    "evaluate_dice",
    "load_config",
    "train_local",
]
