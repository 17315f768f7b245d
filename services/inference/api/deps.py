"""Annotated dependencies of the inference API."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from services.inference.context import InferenceContext
from shared.auth import Principal, Role, role_checker
from shared.deps import SessionDep, context_getter  # noqa: F401  (SessionDep: re-exported for the routes)

get_context = context_getter(InferenceContext)
ContextDep = Annotated[InferenceContext, Depends(get_context)]
# Who may ask for segmentations and read them: researchers, operators, and a PACS/modality that triggers them.
SegmentationCaller = Annotated[Principal, Depends(role_checker(Role.RESEARCHER, Role.OPERATOR, Role.PACS))]
# Exporting a version for serving changes what the serving tier can load: operators only.
OperatorCaller = Annotated[Principal, Depends(role_checker(Role.OPERATOR))]
