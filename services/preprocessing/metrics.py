"""Preprocessing metrics (names are part of the platform contract used by dashboards and alerts)."""

from prometheus_client import Counter, Histogram

CASE_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

cases_processed_total = Counter(
    "voxelflow_preprocessing_cases_processed_total",
    "Cases handled: imported (msd, catalogue) or preprocessed (computed, cached = already in storage).",
    ["stage", "outcome"],
)
cases_failed_total = Counter(
    "voxelflow_preprocessing_cases_failed_total", "Cases that could not be imported or preprocessed.", ["stage"]
)
case_seconds = Histogram(
    "voxelflow_preprocessing_case_seconds",
    "Time per case, by stage (import, preprocess).",
    ["stage"],
    buckets=CASE_SECONDS_BUCKETS,
)
dataset_versions_total = Counter(
    "voxelflow_preprocessing_dataset_versions_total", "Dataset builds finished, by outcome.", ["outcome"]
)
qc_excluded_total = Counter(
    "voxelflow_preprocessing_qc_excluded_total", "Cases excluded from dataset versions by quality control."
)
