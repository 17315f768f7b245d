"""Annotated dependencies of the inference API."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from services.inference.context import InferenceContext
from shared.auth import Principal, Role, role_checker


def get_context(request: Request) -> InferenceContext:
    return request.app.state.ctx


def get_session(ctx: Annotated[InferenceContext, Depends(get_context)]) -> Iterator[Session]:
    with ctx.session_factory() as session:
        yield session


ContextDep = Annotated[InferenceContext, Depends(get_context)]
SessionDep = Annotated[Session, Depends(get_session)]
# Who may ask for segmentations and read them: researchers, operators, and a PACS/modality that triggers them.
SegmentationCaller = Annotated[Principal, Depends(role_checker(Role.RESEARCHER, Role.OPERATOR, Role.PACS))]
# Exporting a version for serving changes what the serving tier can load: operators only.
OperatorCaller = Annotated[Principal, Depends(role_checker(Role.OPERATOR))]
