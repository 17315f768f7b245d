"""Ingest metrics (names are part of the platform contract used by dashboards and alerts)."""

from prometheus_client import Counter, Gauge

instances_received_total = Counter(
    "voxelflow_ingest_instances_received_total",
    "DICOM instances accepted (stored or already stored).",
    ["source"],
)
instances_rejected_total = Counter(
    "voxelflow_ingest_instances_rejected_total", "DICOM instances refused, by reason.", ["source", "reason"]
)
bytes_received_total = Counter(
    "voxelflow_ingest_bytes_received_total", "Bytes of DICOM instances received.", ["source"]
)
series_reconstructed_total = Counter(
    "voxelflow_ingest_series_reconstructed_total",
    "Completed series: reconstructed into a volume, or flagged as non-volumetric.",
    ["outcome"],
)
last_received_timestamp_seconds = Gauge(
    "voxelflow_ingest_last_received_timestamp_seconds",
    "Unix time of the last instance accepted from each source (alert: no data from the PACS).",
    ["source"],
)
