"""Annotated dependencies of the aggregation API."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from services.aggregation.context import AggregationContext
from shared.auth import Principal, Role, role_checker


def get_context(request: Request) -> AggregationContext:
    ctx: AggregationContext = request.app.state.ctx
    return ctx


def get_session(ctx: Annotated[AggregationContext, Depends(get_context)]) -> Iterator[Session]:
    with ctx.session_factory() as session:
        yield session


ContextDep = Annotated[AggregationContext, Depends(get_context)]
SessionDep = Annotated[Session, Depends(get_session)]
# Researchers start, follow and cancel training runs; operators may too (they run the platform).
RunCaller = Annotated[Principal, Depends(role_checker(Role.RESEARCHER, Role.OPERATOR))]
