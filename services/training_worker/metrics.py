"""Training-worker metrics (names are part of the platform contract used by dashboards and alerts)."""

from prometheus_client import Counter, Gauge

epochs_total = Counter("voxelflow_training_epochs_total", "Local training epochs completed.", ["site", "run_id"])
samples_per_second = Gauge(
    "voxelflow_training_samples_per_second", "Training throughput of the last epoch.", ["site", "run_id"]
)
train_loss = Gauge("voxelflow_training_loss", "Mean training loss of the last epoch.", ["site", "run_id"])
val_dice = Gauge("voxelflow_training_val_dice", "Validation Dice of the last validated epoch.", ["site", "run_id"])
rounds_total = Counter(
    "voxelflow_training_rounds_total",
    "Round tasks by outcome: trained, resumed (trained after a checkpoint), replayed (update already "
    "delivered), skipped (the round was aggregated before the task started), refused (bad task), diverged.",
    ["site", "outcome"],
)
