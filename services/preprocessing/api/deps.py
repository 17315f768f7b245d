"""Annotated dependencies of the preprocessing API."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from services.preprocessing.context import PreprocessingContext
from shared.auth import Principal, Role, role_checker
from shared.deps import SessionDep, context_getter  # noqa: F401  (SessionDep: re-exported for the routes)

get_context = context_getter(PreprocessingContext)
ContextDep = Annotated[PreprocessingContext, Depends(get_context)]
# Datasets are research material: researchers and operators read and build them; a PACS token may not.
ReadCaller = Annotated[Principal, Depends(role_checker(Role.RESEARCHER, Role.OPERATOR))]
BuildCaller = Annotated[Principal, Depends(role_checker(Role.RESEARCHER, Role.OPERATOR))]
