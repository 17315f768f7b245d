"""Model-registry metrics (names are part of the platform contract used by dashboards and alerts)."""

from prometheus_client import Counter, Gauge

promotions_total = Counter(
    "voxelflow_registry_promotions_total",
    "Promotion requests by outcome: promoted, refused (gate), forced (admin override).",
    ["model", "outcome"],
)
champion_version = Gauge(
    "voxelflow_registry_champion_version", "Version number holding the champion alias, per model.", ["model"]
)
