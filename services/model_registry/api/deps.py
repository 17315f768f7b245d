"""Annotated dependencies of the model-registry API."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from services.model_registry.context import ModelRegistryContext
from shared.auth import Principal, Role, role_checker
from shared.deps import context_getter

get_context = context_getter(ModelRegistryContext)
ContextDep = Annotated[ModelRegistryContext, Depends(get_context)]
# Researchers and operators read models; operators promote; only admins may override the gate (force).
ReadCaller = Annotated[Principal, Depends(role_checker(Role.RESEARCHER, Role.OPERATOR))]
OperatorCaller = Annotated[Principal, Depends(role_checker(Role.OPERATOR))]
