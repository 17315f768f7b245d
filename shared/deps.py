"""Annotated FastAPI dependencies every service shares (``services/<name>/api/deps.py`` builds on these).

The app built by :func:`shared.service_app.build_service_app` keeps the service's context in
``app.state.ctx``; a request reaches it through :func:`context_getter` and gets one database session per
request through :data:`SessionDep` (closed when the response is sent). A service's ``deps.py`` is then::

    get_context = context_getter(IngestContext)
    ContextDep = Annotated[IngestContext, Depends(get_context)]

plus its role checks (who may call what), which are the only lines that differ between services.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from shared.service_context import ServiceContext

C = TypeVar("C", bound=ServiceContext)


def get_service_context(request: Request) -> ServiceContext:
    ctx: ServiceContext = request.app.state.ctx
    return ctx


def context_getter(context_type: type[C]) -> Callable[[Request], C]:
    """A dependency that returns the app's context as ``context_type`` (a wrong wiring fails loudly)."""

    def get_context(request: Request) -> C:
        ctx = request.app.state.ctx
        if not isinstance(ctx, context_type):
            raise TypeError(f"app.state.ctx is a {type(ctx).__name__}, not a {context_type.__name__}")
        return ctx

    get_context.__qualname__ = f"get_{context_type.__name__}"
    return get_context


def get_session(ctx: Annotated[ServiceContext, Depends(get_service_context)]) -> Iterator[Session]:
    with ctx.session_factory() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
