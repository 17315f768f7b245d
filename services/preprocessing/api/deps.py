"""Annotated dependencies of the preprocessing API."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from services.preprocessing.context import PreprocessingContext
from shared.auth import Principal, Role, role_checker


def get_context(request: Request) -> PreprocessingContext:
    ctx: PreprocessingContext = request.app.state.ctx
    return ctx


def get_session(ctx: Annotated[PreprocessingContext, Depends(get_context)]) -> Iterator[Session]:
    with ctx.session_factory() as session:
        yield session


ContextDep = Annotated[PreprocessingContext, Depends(get_context)]
SessionDep = Annotated[Session, Depends(get_session)]
# Datasets are research material: researchers and operators read and build them; a PACS token may not.
ReadCaller = Annotated[Principal, Depends(role_checker(Role.RESEARCHER, Role.OPERATOR))]
BuildCaller = Annotated[Principal, Depends(role_checker(Role.RESEARCHER, Role.OPERATOR))]
