"""Annotated dependencies of the aggregation API."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from services.aggregation.context import AggregationContext
from shared.auth import Principal, Role, role_checker
from shared.deps import SessionDep, context_getter  # noqa: F401  (SessionDep: re-exported for the routes)

get_context = context_getter(AggregationContext)
ContextDep = Annotated[AggregationContext, Depends(get_context)]
# Researchers start, follow and cancel training runs; operators may too (they run the platform).
RunCaller = Annotated[Principal, Depends(role_checker(Role.RESEARCHER, Role.OPERATOR))]
