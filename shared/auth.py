"""API tokens and roles, as FastAPI dependencies.

Tokens are random 256-bit secrets shown once at creation; only their SHA-256 is stored (a slow hash
buys nothing for high-entropy secrets and would cost a KDF per request). PACS and modalities often
only speak HTTP Basic, so ``Authorization: Basic base64(name:token)`` is accepted beside ``Bearer``.

Every token expires (``expires_at``; :data:`DEFAULT_TOKEN_LIFETIME` unless its creator chose another
lifetime, or none for a service-to-service token) and may be scoped to one project: a service refuses (403)
a token scoped to a project other than the one it serves (``VOXELFLOW_PROJECT``), and
:func:`require_project` is the hook for a resource that carries its own project.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import enum
import hashlib
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import HTTPException, Request, status
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared.db.base import session_scope, utcnow
from shared.db.models import ApiToken

TOKEN_PREFIX = "vf_"
#: lifetime of a token whose creator did not choose one (``voxelflow tokens create --expires-in``)
DEFAULT_TOKEN_LIFETIME = dt.timedelta(days=30)
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


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
    #: the only project this caller may act in; None: not scoped (any project)
    project: str | None = None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_duration(text: str) -> dt.timedelta | None:
    """``30m``, ``8h``, ``7d``, ``2w`` (a whole number and one unit) as a timedelta; ``never`` is None."""
    if text.strip().lower() == "never":
        return None
    match = _DURATION.match(text.lower())
    if match is None or int(match.group(1)) == 0:
        raise ValueError(f"{text!r} is not a duration: use a positive whole number and s, m, h, d or w (8h, 30d)")
    return dt.timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def create_token(
    session: Session,
    name: str,
    role: Role,
    *,
    expires_in: dt.timedelta | None = DEFAULT_TOKEN_LIFETIME,
    project: str | None = None,
) -> str:
    """Create a token and return its secret (the only time it is visible).

    ``expires_in=None`` makes a token that never expires: meant for service-to-service tokens kept in a
    Secret and rotated by revoking; people's tokens should expire.
    """
    if expires_in is not None and expires_in <= dt.timedelta(0):
        raise ValueError("a token's lifetime must be positive")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    expires_at = utcnow() + expires_in if expires_in is not None else None
    session.add(
        ApiToken(name=name, role=role.value, token_hash=hash_token(secret), expires_at=expires_at, project=project)
    )
    session.flush()
    return secret


def _aware(moment: dt.datetime) -> dt.datetime:
    """SQLite hands timestamps back without their zone; they were written in UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)


def require_project(principal: Principal, project: str) -> None:
    """403 unless ``principal`` may act in ``project``: the check hook for anything that belongs to one."""
    if principal.project is not None and principal.project != project:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"token {principal.name!r} is scoped to project {principal.project!r}, not {project!r}",
        )


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

    def __init__(self, session_factory: sessionmaker[Session], project: str | None = None):
        self._session_factory = session_factory
        #: the project this service serves: a token scoped to another one is refused (403)
        self._project = project

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
            if token is None or token.revoked_at is not None:
                raise HTTPException(
                    status.HTTP_401_UNAUTHORIZED,
                    "unknown or revoked token",
                    headers={"WWW-Authenticate": 'Bearer realm="voxelflow"'},
                )
            expires_at = _aware(token.expires_at) if token.expires_at is not None else None
            principal = Principal(token.name, Role(token.role), token.project)
        if expires_at is not None and expires_at <= utcnow():
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                f"token {principal.name!r} expired at {expires_at.isoformat(timespec='seconds')}; "
                "create a new one (voxelflow tokens create)",
                headers={"WWW-Authenticate": 'Bearer realm="voxelflow", error="invalid_token"'},
            )
        if self._project is not None:
            require_project(principal, self._project)
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
