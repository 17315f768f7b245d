"""Annotated dependencies of the ingest API."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from services.ingest.context import IngestContext
from shared.auth import Principal, Role, role_checker


def get_context(request: Request) -> IngestContext:
    ctx: IngestContext = request.app.state.ctx
    return ctx


def get_session(ctx: Annotated[IngestContext, Depends(get_context)]) -> Iterator[Session]:
    with ctx.session_factory() as session:
        yield session


ContextDep = Annotated[IngestContext, Depends(get_context)]
SessionDep = Annotated[Session, Depends(get_session)]
# Who may do what: PACS push and query; researchers query and retrieve; operators also pull from a PACS.
StoreCaller = Annotated[Principal, Depends(role_checker(Role.PACS, Role.OPERATOR))]
QueryCaller = Annotated[Principal, Depends(role_checker(Role.PACS, Role.RESEARCHER, Role.OPERATOR))]
OperatorCaller = Annotated[Principal, Depends(role_checker(Role.OPERATOR))]
AdminCaller = Annotated[Principal, Depends(role_checker())]
