"""Exports requested over the API: a row per request, the work done by the inference worker.

Why a job and not a synchronous call: an export rebuilds the network, runs the parity gate on real cases,
writes ONNX and TorchScript, attaches them to the registry version and writes the Triton repository; that
takes from seconds to minutes, longer than an HTTP request should be held open. The row is what the
client follows (``GET /v1/model-exports/{id}``), and the task is idempotent by its ID: a finished export
is returned as it is, a redelivered one is run again and writes the same objects.
"""

from __future__ import annotations

import logging
from typing import Any

from services.inference.export import ExportError, ExportResult, export_registered_model
from services.inference.models import ModelExport
from services.inference.parity_cases import ParityCasesError
from shared.db.base import session_scope, utcnow
from shared.registry import RegistryError, registry_client

log = logging.getLogger("voxelflow.inference.exports")
FINAL = ("succeeded", "failed")


class ExportRefusedError(Exception):
    """The export cannot succeed as asked (gate failed, unknown model, unreadable cases): not worth a retry."""


def result_summary(result: ExportResult) -> dict[str, Any]:
    """What a client needs to know of an export, as JSON."""
    parity = result.parity
    return {
        "model_name": result.model_name,
        "version": result.version,
        "parity": {
            "passed": parity.passed,
            "max_abs_logit_diff": parity.max_abs_logit_diff,
            "per_case_dice": parity.per_case_dice,
            "tolerance": parity.tolerance,
            "min_dice": parity.min_dice,
            "summary": parity.summary(),
        },
        "attached": list(result.attached),
        "triton_keys": list(result.triton_keys),
        "tensorrt": {"built": result.tensorrt.built, "reason": result.tensorrt.reason},
        "int8": {
            "requested": result.int8.requested,
            "passed": result.int8.passed,
            "reason": result.int8.reason,
            "per_case_dice": result.int8.per_case_dice,
            "max_dice_loss": result.int8.max_dice_loss,
            "fp32_bytes": result.int8.fp32_bytes,
            "int8_bytes": result.int8.int8_bytes,
        },
        "pruned_versions": list(result.pruned_versions),
    }


def run_export(ctx: Any, export_id: str) -> ModelExport:
    """Run the export ``export_id`` (an :class:`InferenceContext` gives the store and the registry)."""
    with session_scope(ctx.session_factory) as session:
        row = session.get(ModelExport, export_id)
        if row is None:
            raise ExportRefusedError(f"no model export {export_id}")
        if row.status in FINAL:
            session.expunge(row)
            return row
        row.status = "running"
        model_uri, options = row.model_uri, dict(row.options)
    try:
        client = registry_client(ctx.settings.mlflow_tracking_uri)
        outcome: dict[str, Any] = {"status": "succeeded"}
        outcome["result"] = result_summary(export_registered_model(model_uri, ctx.store, client=client, **options))
    except (ExportError, ParityCasesError, RegistryError, ValueError) as exc:
        log.warning("export %s of %s failed: %s", export_id, model_uri, exc)
        outcome = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    with session_scope(ctx.session_factory) as session:
        row = session.get(ModelExport, export_id)
        assert row is not None
        for key, value in outcome.items():
            setattr(row, key, value)
        row.finished_at = utcnow()
        session.flush()
        session.expunge(row)
    return row
