"""Evaluation reports: the table ``voxelflow evaluate`` prints, and the JSON/CSV files it writes."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from shared.evaluation.metrics import METRICS

_DISTANCES = {"hd95", "asd"}


def _cell(stats: Mapping[str, Any], metric: str) -> str:
    mean, low, high = stats["mean"], stats["ci_low"], stats["ci_high"]
    if not math.isfinite(mean):
        return "n/a"
    digits = 2 if metric in _DISTANCES else 3
    interval = f" [{low:.{digits}f}-{high:.{digits}f}]" if math.isfinite(low) and math.isfinite(high) else ""
    return f"{mean:.{digits}f}{interval}"


def format_table(summary: Mapping[str, Mapping[str, Mapping[str, Any]]], metrics: Sequence[str] = METRICS) -> str:
    """One row per label, one column per metric: ``mean [95 % CI]`` (distances in mm)."""
    header = ["label", *(f"{m} (mm)" if m in _DISTANCES else m for m in metrics)]
    rows = [[label, *(_cell(per_metric[m], m) for m in metrics)] for label, per_metric in summary.items()]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)) for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON: they become null (= undefined, see shared.evaluation.metrics)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: Path, report: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(report), indent=2, sort_keys=False) + "\n")
    return path


def write_csv(path: Path, records: Sequence[Mapping[str, Any]]) -> Path:
    """One row per case and label (the per-case records; the summary is in the JSON and the table)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not records:
        raise ValueError("no records to write")
    columns = list(dict.fromkeys(key for record in records for key in record))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for record in records:
            writer.writerow(
                {k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
            )
    return path


def write_report(path: Path, report: Mapping[str, Any]) -> list[Path]:
    """Write ``report`` (keys ``cases`` and ``summary``) as ``path``; ``.csv`` also gets a ``.json`` beside it.

    Why both for CSV: a CSV holds one table, the per-case rows; the summary with its intervals would
    otherwise be lost.
    """
    suffix = path.suffix.lower()
    if suffix == ".json":
        return [write_json(path, report)]
    if suffix == ".csv":
        return [write_csv(path, report["cases"]), write_json(path.with_suffix(".json"), report)]
    raise ValueError(f"report file must end in .json or .csv, got {path.name!r}")
