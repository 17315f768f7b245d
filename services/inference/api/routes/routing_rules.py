"""``/v1/routing-rules``: the operator's rules that send newly completed series to a model automatically.

A rule is checked when it is written, not when a series arrives: its pattern compiles, its model alias is
one this service serves, its destination is a DICOMweb root or a ``dicom://`` node (or, left empty, the
service's ``pacs_url``, which must then be configured). A stored rule can therefore always be applied; what
can still fail at routing time (the PACS down, the model not warm) is retried and dead-lettered by the
segmentation task. Operators (and admin) only: a rule decides where patient images' results go. Every call
is audited by the service's middleware, with the rule's ID as the object.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Request, Response, status
from fastapi import Path as PathParam
from pydantic import BaseModel, Field, field_validator
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.inference.api.deps import ContextDep, OperatorCaller, SessionDep
from services.inference.context import InferenceContext
from services.inference.models import RoutingRule
from services.inference.routing import MAX_PATTERN_LENGTH, compile_pattern
from shared.db.base import utcnow
from shared.http import add_audit_uids
from shared.validation import DICOM_UID_PATTERN, SAFE_TEXT_PATTERN

router = APIRouter(prefix="/v1/routing-rules", tags=["routing rules"])

#: the same destinations ``pacs_url`` accepts: a DICOMweb root (STOW-RS) or a DICOM node (C-STORE)
DESTINATION_PATTERN = r"^(https?://[^\s\x00-\x1f]+|dicom://[^@\\/\x00-\x1f]{1,16}@[^:/@\s]+:\d{1,5}/?)$"
CODE_STRING = r"^[A-Za-z0-9_ ]*$"  # DICOM CS (modality, body part), compared upper-case


class RoutingRuleIn(BaseModel):
    """Criteria (all optional; empty = any) and the action. The pattern is a Python regular expression
    searched in the series description (``^…$`` to anchor, ``(?i)`` to ignore case)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", examples=["hippocampus-t1"])
    enabled: bool = True
    modality: str | None = Field(default=None, max_length=16, pattern=CODE_STRING, examples=["MR"])
    body_part_examined: str | None = Field(default=None, max_length=16, pattern=CODE_STRING, examples=["BRAIN"])
    series_description_pattern: str | None = Field(
        default=None, max_length=MAX_PATTERN_LENGTH, pattern=SAFE_TEXT_PATTERN, examples=["(?i)hcrop"]
    )
    sop_class_uid: str | None = Field(default=None, max_length=64, pattern=DICOM_UID_PATTERN + "|^$")
    calling_ae_title: str | None = Field(
        default=None, max_length=16, pattern=r"^[^\\\x00-\x1f\x7f]*$", description="the AE that sent the series"
    )
    site: str | None = Field(default=None, max_length=128, pattern=SAFE_TEXT_PATTERN)
    model_alias: str = Field(min_length=1, max_length=64, pattern=SAFE_TEXT_PATTERN, examples=["champion"])
    destination: str | None = Field(
        default=None,
        max_length=512,
        pattern=DESTINATION_PATTERN + "|^$",
        description="http(s)://… DICOMweb root (STOW-RS) or dicom://AET@host:port (C-STORE); empty: pacs_url",
        examples=["http://pacs.example/dicom-web", "dicom://ORTHANC@pacs.example:4242"],
    )

    @field_validator("series_description_pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value:
            try:
                compile_pattern(value)
            except re.error as exc:
                raise ValueError(f"series_description_pattern does not compile: {exc}") from exc
        return value


class RoutingRuleOut(BaseModel):
    id: int
    name: str
    enabled: bool
    modality: str | None
    body_part_examined: str | None
    series_description_pattern: str | None
    sop_class_uid: str | None
    calling_ae_title: str | None
    site: str | None
    model_alias: str
    destination: str | None
    created_by: str | None
    created_at: dt.datetime
    updated_at: dt.datetime


def _checked_values(ctx: InferenceContext, body: RoutingRuleIn) -> dict[str, object]:
    """The row's values, empty strings as NULL (= any), once the alias and destination are known to work."""
    served = sorted(set(ctx.models.aliases.values()))
    if body.model_alias not in served:
        raise HTTPException(422, f"model_alias {body.model_alias!r} is not served here; served: {served}")
    if not body.destination and not ctx.settings.pacs_url:
        raise HTTPException(422, "no destination given and this service has no PACS configured (VOXELFLOW_PACS_URL)")
    values = body.model_dump()
    for key, value in values.items():
        if isinstance(value, str):
            values[key] = value.strip() or None
    for key in ("modality", "body_part_examined"):
        if values[key]:
            values[key] = str(values[key]).upper()
    values["model_alias"] = body.model_alias
    return values


RuleId = Annotated[int, PathParam(ge=1, le=2**31 - 1)]
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing or unknown token"},
    403: {"description": "not an operator"},
    404: {"description": "no such rule"},
    409: {"description": "a rule of that name exists"},
    422: {"description": "invalid rule: pattern does not compile, alias not served, destination not valid"},
}


def _get(session: Session, id: int) -> RoutingRule:
    row = session.get(RoutingRule, id)
    if row is None:
        raise HTTPException(404, f"no routing rule {id}")
    return row


def _commit_named(session: Session, name: str, except_id: int | None = None) -> None:
    """Commit, answering 409 for a name another rule holds (checked first; the unique index settles a race)."""
    with session.no_autoflush:  # the pending row itself must not be flushed by this query
        found = session.scalar(select(RoutingRule.id).where(RoutingRule.name == name))
    if found is not None and found != except_id:
        raise HTTPException(409, f"a routing rule named {name!r} exists")
    try:
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        raise HTTPException(409, f"a routing rule named {name!r} exists") from exc


@router.get("", response_model=list[RoutingRuleOut], summary="Every routing rule, in ID order", responses=ERRORS)
def list_rules(session: SessionDep, caller: OperatorCaller) -> list[RoutingRule]:
    return list(session.scalars(select(RoutingRule).order_by(RoutingRule.id)))


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=RoutingRuleOut,
    summary="Create a routing rule (applies to series completed from now on)",
    responses=ERRORS,
)
def create_rule(
    body: RoutingRuleIn,
    request: Request,
    response: Response,
    ctx: ContextDep,
    session: SessionDep,
    caller: OperatorCaller,
) -> RoutingRule:
    values = _checked_values(ctx, body)
    row = RoutingRule(**values, created_by=caller.name, created_at=utcnow(), updated_at=utcnow())
    session.add(row)
    _commit_named(session, body.name)
    add_audit_uids(request, f"routing-rule:{row.id}")
    response.headers["Location"] = f"/v1/routing-rules/{row.id}"
    return row


@router.get("/{id}", response_model=RoutingRuleOut, summary="One routing rule", responses=ERRORS)
def get_rule(id: RuleId, session: SessionDep, caller: OperatorCaller) -> RoutingRule:
    return _get(session, id)


@router.put("/{id}", response_model=RoutingRuleOut, summary="Replace a routing rule", responses=ERRORS)
def replace_rule(
    id: RuleId, body: RoutingRuleIn, request: Request, ctx: ContextDep, session: SessionDep, caller: OperatorCaller
) -> RoutingRule:
    row = _get(session, id)
    values = _checked_values(ctx, body)
    for key, value in values.items():
        setattr(row, key, value)
    row.updated_at = utcnow()
    _commit_named(session, body.name, except_id=id)
    add_audit_uids(request, f"routing-rule:{row.id}")
    return row


@router.delete("/{id}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete a routing rule", responses=ERRORS)
def delete_rule(id: RuleId, request: Request, session: SessionDep, caller: OperatorCaller) -> Response:
    """Requests the rule already made keep running; no new series is routed by it."""
    session.delete(_get(session, id))
    session.commit()
    add_audit_uids(request, f"routing-rule:{id}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)
