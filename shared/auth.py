"""API tokens and roles, as FastAPI dependencies.

Tokens are random 256-bit secrets shown once at creation; only their SHA-256 is stored (a slow hash
buys nothing for high-entropy secrets and would cost a KDF per request). PACS and modalities often
only speak HTTP Basic, so ``Authorization: Basic base64(name:token)`` is accepted beside ``Bearer``.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import HTTPException, Request, status
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared.db.base import session_scope, utcnow
from shared.db.models import ApiToken

TOKEN_PREFIX = "vf_"


class Role(enum.StrEnum):
    """What a caller may do. ``admin`` may do everything, including reading re-identification maps."""

    PACS = "pacs"  # a PACS or modality pushing/pulling images
    RESEARCHER = "researcher"  # queries, datasets, training runs, reads models
    OPERATOR = "operator"  # runs the platform: pulls from PACS, retries dead letters, promotes models
    ADMIN = "admin"


#: Roles that may look data up by an original (pre-de-identification) patient identifier: the clinical side
#: that already knows it (a PACS) and admin. A researcher matches pseudonyms only, so cannot turn an MRN into
#: its pseudonym by querying (issue 14).
ORIGINAL_IDENTIFIER_ROLES = frozenset({Role.PACS, Role.ADMIN})


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, name: str, role: Role) -> str:
    """Create a token and return its secret (the only time it is visible)."""
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(name=name, role=role.value, token_hash=hash_token(secret)))
    session.flush()
    return secret


def revoke_token(session: Session, name: str) -> bool:
    token = session.scalar(select(ApiToken).where(ApiToken.name == name, ApiToken.revoked_at.is_(None)))
    if token is None:
        return False
    token.revoked_at = utcnow()
    return True


def _secret_from_header(header: str) -> str | None:
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return value.strip() or None
    if scheme == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2] or None
    return None


class TokenAuthenticator:
    """Resolves the request's credentials to a :class:`Principal` and records it for the audit log."""

    def __init__(self, session_factory: sessionmaker[Session]):
        self._session_factory = session_factory

    def authenticate(self, request: Request) -> Principal:
        already: Principal | None = getattr(request.state, "principal", None)
        if already is not None:  # shared.http.AuthenticateFirstMiddleware looked the token up for this request
            return already
        header = request.headers.get("authorization")
        secret = _secret_from_header(header) if header else None
        if secret is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "missing or malformed credentials: send 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": 'Bearer realm="voxelflow", Basic realm="voxelflow"'},
            )
        with session_scope(self._session_factory) as session:
            token = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(secret)))
            principal = Principal(token.name, Role(token.role)) if token and token.revoked_at is None else None
        if principal is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "unknown or revoked token",
                headers={"WWW-Authenticate": 'Bearer realm="voxelflow"'},
            )
        request.state.principal = principal
        return principal


def role_checker(*allowed: Role) -> Callable[[Request], Principal]:
    """A dependency that authenticates and admits only ``allowed`` roles (admin is always admitted)."""
    allowed_set = {*allowed, Role.ADMIN}

    def check(request: Request) -> Principal:
        authenticator: TokenAuthenticator = request.app.state.authenticator
        principal = authenticator.authenticate(request)
        if principal.role not in allowed_set:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"role {principal.role.value!r} may not do this; needs one of "
                + ", ".join(sorted(r.value for r in allowed_set)),
            )
        return principal

    return check
