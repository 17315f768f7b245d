"""``inference.route_series``: a completed series offered by ingest meets the routing rules.

For each enabled rule that matches (:func:`services.inference.routing.match_rules`), one segmentation request
is made (ID :func:`~services.inference.routing.routed_request_id`: the same for the same rule and series, so
a redelivered or repeated offer makes no second request) and queued as an ordinary ``inference.segment`` job:
the rule's model alias, ``send_to_pacs`` to the rule's destination. From there it is the path every job takes
— retries on connection errors, a dead letter when retries are spent or the error is permanent — and each
step is audited (:mod:`services.inference.routing_steps`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sqlalchemy import select

from services.inference.models import RoutingRule
from services.inference.routing import SeriesFacts, match_rules, routed_request_id
from services.inference.routing_steps import record_step
from services.inference.segment_request import create_request
from shared.contracts.tasks import INFERENCE_QUEUE, SEGMENT_TASK
from shared.proto.voxelflow.v1.ingest_pb2 import SeriesIngested

if TYPE_CHECKING:
    from services.inference.context import InferenceContext

log = logging.getLogger("voxelflow.inference.routing")


def facts_of(message: SeriesIngested) -> SeriesFacts:
    return SeriesFacts(
        series_instance_uid=message.series_instance_uid,
        study_instance_uid=message.study_instance_uid,
        modality=message.modality,
        body_part_examined=message.body_part_examined,
        series_description=message.series_description,
        sop_class_uid=message.sop_class_uid,
        calling_ae_title=message.calling_ae_title,
        site=message.site,
        volumetric=not message.non_volumetric_reason and bool(message.volume_uri),
    )


def route_series(ctx: InferenceContext, message: SeriesIngested) -> list[str]:
    """Make (or find again) one request per matching rule and queue the new ones; returns their IDs."""
    series = facts_of(message)
    with ctx.session_factory() as session:
        rules = list(session.scalars(select(RoutingRule).where(RoutingRule.enabled.is_(True))))
        session.expunge_all()
    matched = match_rules(series, rules)
    if not matched:
        log.info("series %s matches no routing rule", series.series_instance_uid)
        return []
    request_ids = []
    for rule in matched:
        request_id = routed_request_id(rule.id, series.series_instance_uid)
        options = {
            "send_to_pacs": True,
            "destination": rule.destination,
            "largest_component": ctx.settings.keep_largest_component,
            "rule_id": rule.id,
            "rule_name": rule.name,
            "study_instance_uid": series.study_instance_uid,  # pseudonymised; for the audit rows of each step
        }
        outcome = create_request(
            ctx,
            request_id=request_id,
            source_kind="series_instance_uid",
            source_ref=series.series_instance_uid,
            model_alias=rule.model_alias,
            options=options,
            created_by=f"routing-rule:{rule.name}",
        )
        if not outcome.reused:
            record_step(
                ctx,
                "ROUTED",
                request_id=request_id,
                options=options,
                series_uid=series.series_instance_uid,
                study_uid=series.study_instance_uid,
            )
        # queued: new, or made by an offer that stopped before it queued the job (a redelivery then queues it;
        # should both have queued it, the job is idempotent by request ID)
        if outcome.row.status == "queued":
            ctx.celery.send_task(SEGMENT_TASK, args=[request_id], queue=INFERENCE_QUEUE)
        request_ids.append(request_id)
    return request_ids
