"""Aggregation metrics (names are part of the platform contract used by dashboards and alerts)."""

from prometheus_client import Counter, Gauge, Histogram

runs_total = Counter(
    "voxelflow_aggregation_runs_total", "Federated runs by lifecycle event (started, succeeded, failed).", ["event"]
)
rounds_dispatched_total = Counter("voxelflow_aggregation_rounds_dispatched_total", "Rounds sent to the sites.")
rounds_aggregated_total = Counter("voxelflow_aggregation_rounds_aggregated_total", "Rounds aggregated.")
updates_total = Counter(
    "voxelflow_aggregation_updates_total",
    "Site updates seen, by outcome (accepted, late, duplicate, unknown_attempt, unknown_site, invalid).",
    ["outcome"],
)
site_outcomes_total = Counter(
    "voxelflow_aggregation_site_outcomes_total", "Site round tasks that did not deliver, by reason.", ["outcome"]
)
round_participants = Histogram(
    "voxelflow_aggregation_round_participants",
    "Sites whose update went into a round's aggregate.",
    buckets=(1, 2, 3, 4, 5, 8, 10, 16, 32, 64),
)
rounds_failed_total = Counter(
    "voxelflow_aggregation_rounds_failed_total",
    "Rounds closed without a quorum of delivered updates (each one fails its run).",
)
round_duration_seconds = Histogram(
    "voxelflow_aggregation_round_duration_seconds",
    "Wall time of an aggregated round, from its start (dispatch) to the new global model.",
    buckets=(10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400),
)
privacy_epsilon = Gauge(
    "voxelflow_aggregation_privacy_epsilon",
    "Privacy budget (epsilon) a differentially private run has spent after its latest aggregated round. "
    "Labelled by run: federated runs are few and long, and the budget is a per-run figure.",
    ["run_id"],
)
