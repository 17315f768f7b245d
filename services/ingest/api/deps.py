"""Annotated dependencies of the ingest API."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from services.ingest.context import IngestContext
from shared.auth import Principal, Role, role_checker
from shared.deps import SessionDep, context_getter  # noqa: F401  (SessionDep: re-exported for the routes)

get_context = context_getter(IngestContext)
ContextDep = Annotated[IngestContext, Depends(get_context)]
# Who may do what: PACS push and query; researchers query and retrieve; operators also pull from a PACS.
StoreCaller = Annotated[Principal, Depends(role_checker(Role.PACS, Role.OPERATOR))]
QueryCaller = Annotated[Principal, Depends(role_checker(Role.PACS, Role.RESEARCHER, Role.OPERATOR))]
OperatorCaller = Annotated[Principal, Depends(role_checker(Role.OPERATOR))]
AdminCaller = Annotated[Principal, Depends(role_checker())]
