"""What happens to a routed series, step by step: an audit row and a metric per step.

A request made by a routing rule carries ``rule_id`` and ``rule_name`` in its options; every step it goes
through (``ROUTED`` when the rule made it, ``SEGMENTED`` when the outputs are stored, ``SENT`` when the
destination confirmed them, ``FAILED`` when it was given up) is written to the audit log like an API call,
with the rule as principal, and counted in ``voxelflow_routing_series_total{rule, outcome}``. Why in the
audit log: nobody called an API for these segmentations, so without these rows nothing would say who decided
that a patient's series went to a model and where its result was sent. Requests made over the API have no
rule and record nothing here (the HTTP middleware audits those).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from services.inference import metrics
from shared import audit

if TYPE_CHECKING:
    from services.inference.context import InferenceContext

log = logging.getLogger("voxelflow.inference.routing")

#: step → (HTTP-like status for the audit row, its outcome, the metric outcome or None)
STEPS: dict[str, tuple[int, str, str | None]] = {
    "ROUTED": (202, "success", "routed"),
    "SEGMENTED": (200, "success", None),
    "SENT": (200, "success", "succeeded"),
    "FAILED": (500, "error", "failed"),
    "UNROUTED": (204, "success", None),
}


def record_step(
    ctx: InferenceContext,
    step: str,
    *,
    request_id: str,
    options: dict[str, Any],
    series_uid: str,
    study_uid: str = "",
    detail: str = "",
) -> None:
    """One audit row (and metric) for a step of a routed request; nothing for a request no rule made."""
    rule_id, rule_name = options.get("rule_id"), options.get("rule_name")
    if rule_id is None:
        return
    status_code, outcome, metric_outcome = STEPS[step]
    if step == "FAILED" and detail.startswith("permanent"):
        status_code, outcome = 422, "rejected"
    audit.record(
        ctx.session_factory,
        service="inference",
        request_id=request_id,
        principal=f"routing-rule:{rule_name}",
        role="operator",
        method=step,
        path=f"/v1/routing-rules/{rule_id}",
        object_uids=[series_uid, study_uid or str(options.get("study_instance_uid") or ""), request_id],
        status_code=status_code,
        outcome=outcome,
        client=None,
    )
    if metric_outcome:
        metrics.routing_series_total.labels(str(rule_name), metric_outcome).inc()
    log.info(
        "routed series %s rule %s: %s %s",
        series_uid,
        rule_name,
        step,
        detail,
        extra={"series_uid": series_uid, "request_id": request_id, "rule": rule_name, "step": step},
    )
