"""``/models``: registered models, their versions with lineage, comparison, and promotion to champion."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from services.model_registry import metrics
from services.model_registry.api.deps import ContextDep, OperatorCaller, ReadCaller
from services.model_registry.versions import (
    NotFoundError,
    compare_versions,
    list_models,
    list_versions,
    promote,
    version_detail,
)
from shared.auth import Role
from shared.http import add_audit_uids
from shared.validation import INT32_MAX, SAFE_TEXT_PATTERN

log = logging.getLogger("voxelflow.model_registry")
router = APIRouter(prefix="/models", tags=["models"])

ModelName = Annotated[str, Path(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
Version = Annotated[int, Path(ge=1, le=INT32_MAX, description="Version number")]


class PromoteRequest(BaseModel):
    # For the OpenAPI document (the route enforces it): a forced promotion says why.
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"properties": {"force": {"const": False}}},
                {"required": ["reason"], "properties": {"reason": {"type": "string", "minLength": 1}}},
            ]
        }
    )

    force: bool = Field(default=False, description="Admin only: promote even if the gate refuses (audited).")
    reason: str | None = Field(
        default=None, max_length=1000, pattern=SAFE_TEXT_PATTERN, description="Why (required with force)."
    )


class PromoteOut(BaseModel):
    """The gate's decision and what was done: 200 when the version is (or already was) the champion, 409 when
    the gate refused it."""

    model: str
    version: int
    promoted: bool
    forced: bool
    previous_champion: int | None
    promote: bool = Field(description="the gate's decision")
    reasons: list[str]
    statistics: dict[str, Any]


def _not_found(exc: NotFoundError) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, str(exc))


@router.get("", summary="Registered models with their aliases")
def get_models(ctx: ContextDep, _: ReadCaller) -> list[dict[str, Any]]:
    return list_models(ctx.registry)


@router.get("/{name}/versions", summary="Versions of a model, newest first")
def get_versions(name: ModelName, ctx: ContextDep, _: ReadCaller, request: Request) -> list[dict[str, Any]]:
    add_audit_uids(request, f"models:/{name}")
    try:
        return list_versions(ctx.registry, name)
    except NotFoundError as exc:
        raise _not_found(exc) from exc


@router.get("/{name}/versions/{version}", summary="One version with its lineage and held-out per-case Dice")
def get_version(name: ModelName, version: Version, ctx: ContextDep, _: ReadCaller, request: Request) -> dict[str, Any]:
    add_audit_uids(request, f"models:/{name}/{version}")
    try:
        return version_detail(ctx.registry, name, version, ctx.ui_url)
    except NotFoundError as exc:
        raise _not_found(exc) from exc


@router.get(
    "/{name}/compare",
    summary="Compare two versions (parameters, metrics, paired test on per-case Dice)",
    responses={422: {"description": "invalid parameters, or a == b (a version is not compared with itself)"}},
)
def get_comparison(
    name: ModelName,
    ctx: ContextDep,
    _: ReadCaller,
    request: Request,
    a: Annotated[int, Query(ge=1, le=INT32_MAX)],
    b: Annotated[int, Query(ge=1, le=INT32_MAX)],
) -> dict[str, Any]:
    add_audit_uids(request, f"models:/{name}/{a}", f"models:/{name}/{b}")
    if a == b:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "compare two different versions (a != b)")
    try:
        return compare_versions(ctx.registry, name, a, b)
    except NotFoundError as exc:
        raise _not_found(exc) from exc


@router.post(
    "/{name}/versions/{version}/promote",
    summary="Make a version the champion if it passes the promotion gate (409 with the reasons if not)",
    response_model=PromoteOut,
    responses={
        403: {"description": "the role may not promote, or a non-admin asked to force"},
        409: {"description": "the gate refused the version; the reasons are in the body", "model": PromoteOut},
        422: {"description": "an invalid body, or force without a reason"},
    },
)
def post_promote(
    name: ModelName,
    version: Version,
    ctx: ContextDep,
    caller: OperatorCaller,
    request: Request,
    body: PromoteRequest | None = None,
) -> JSONResponse:
    body = body or PromoteRequest()
    add_audit_uids(request, f"models:/{name}/{version}")
    if body.force:
        if caller.role is not Role.ADMIN:
            raise HTTPException(status.HTTP_403_FORBIDDEN, "only an admin may force a promotion past the gate")
        if not body.reason:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "a forced promotion needs a reason")
        add_audit_uids(request, "force")
    try:
        outcome = promote(ctx.registry, name, version, ctx.gate, caller.name, force=body.force)
    except NotFoundError as exc:
        raise _not_found(exc) from exc
    payload = {
        "model": name,
        "version": version,
        "promoted": outcome.promoted,
        "forced": outcome.forced,
        "previous_champion": outcome.previous_champion,
        **outcome.decision.to_dict(),
    }
    if not outcome.promoted and not outcome.decision.promote:
        metrics.promotions_total.labels(name, "refused").inc()
        return JSONResponse(payload, status_code=status.HTTP_409_CONFLICT)
    if outcome.promoted:
        metrics.promotions_total.labels(name, "forced" if outcome.forced else "promoted").inc()
        metrics.champion_version.labels(name).set(version)
        if outcome.forced:
            log.warning(
                "forced promotion past the gate",
                extra={"model": name, "version": version, "by": caller.name, "reason": body.reason},
            )
    return JSONResponse(payload)
