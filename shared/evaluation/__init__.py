"""Segmentation evaluation: per-case metrics (MONAI), bootstrap summaries, whole-image inference, reports.

Classification (AUC with DeLong intervals, the paired DeLong test, operating points, calibration) and
detection (FROC, mAP) metrics are in :mod:`shared.evaluation.classification` and
:mod:`shared.evaluation.detection`.
"""

from shared.evaluation.metrics import METRICS, bootstrap_ci, case_metrics, mean_dice_per_case, summarise
from shared.evaluation.report import format_table, write_csv, write_json, write_report

__all__ = [
    "METRICS",
    "bootstrap_ci",
    "case_metrics",
    "format_table",
    "mean_dice_per_case",
    "summarise",
    "write_csv",
    "write_json",
    "write_report",
]
