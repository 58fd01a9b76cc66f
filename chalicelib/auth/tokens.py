"""HS256 JWTs: issue access and refresh tokens of a session, and verify them.

Every token names its signing key in the `kid` header (a digest of the secret, never the
secret): tokens are signed with MAOF_JWT_SECRET and verified against it or any key in
MAOF_JWT_PREVIOUS_SECRETS, so the secret rotates without signing anyone out.
"""

from __future__ import annotations

import functools
import hashlib
import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt

from chalicelib.config import ConfigError, get_settings
from chalicelib.core import errors
from chalicelib.core.api import Principal

ALGORITHM = "HS256"
ACCESS = "access"
REFRESH = "refresh"


def key_id(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()[:16]


def secrets() -> tuple[str, tuple[str, ...]]:
    """The JWT secret and the previous ones; never an empty key (a function whose role may
    not read them, config.SSM_TOKEN_SECRETS, has none and so signs and accepts nothing)."""
    settings = get_settings()
    if not settings.jwt_secret:
        raise ConfigError("no MAOF_JWT_SECRET: only the API function (MAOF_TOKEN_ISSUER) has one")
    return settings.jwt_secret, settings.jwt_previous_secrets


@functools.lru_cache(maxsize=4)
def _verification_keys(current: str, previous: tuple[str, ...]) -> dict[str, str]:
    return {key_id(secret): secret for secret in (current, *previous)}


@dataclass(frozen=True)
class TokenClaims:
    """What a verified token says."""

    principal: Principal
    token_type: str
    session_id: uuid.UUID
    jti: uuid.UUID
    version: int


def issue(
    principal: Principal,
    token_type: str,
    *,
    session_id: uuid.UUID,
    version: int,
    jti: uuid.UUID | None = None,
    not_after: int | None = None,
) -> str:
    """A signed token; it expires after its kind's TTL, or at `not_after` if sooner."""
    settings = get_settings()
    ttl = (
        settings.access_token_ttl_seconds
        if token_type == ACCESS
        else settings.refresh_token_ttl_seconds
    )
    now = int(time.time())
    expires = now + ttl if not_after is None else min(now + ttl, not_after)
    claims = {
        "sub": str(principal.user_uuid),
        "email": principal.email,
        "role": principal.role,
        "type": token_type,
        "iat": now,
        "exp": expires,
        "jti": (jti or uuid.uuid4()).hex,
        "sid": session_id.hex,
        "ver": version,
    }
    secret = secrets()[0]
    return jwt.encode(claims, secret, algorithm=ALGORITHM, headers={"kid": key_id(secret)})


# The hosts that issue and check tokens (Lambda execution environments) read their own
# clocks: a token issued on a host a second ahead had its `iat` in the checker's future and
# was refused as invalid; `exp` is read with the same allowance.
CLOCK_LEEWAY_SECONDS = 30


def decode(token: str, expected_type: str) -> TokenClaims:
    """The claims of a valid token of `expected_type`; 401 for anything else."""
    keys = _verification_keys(*secrets())
    try:
        kid = jwt.get_unverified_header(token).get("kid")
        secret = keys.get(str(kid))
        if secret is None:
            raise errors.Unauthorized("Invalid token")  # signed with a key we do not hold
        claims: dict[str, Any] = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],  # pinned: `alg: none` and key confusion are refused
            options={"require": ["sub", "type", "exp", "iat", "jti", "sid", "ver"]},
            leeway=CLOCK_LEEWAY_SECONDS,
        )
    except jwt.ExpiredSignatureError:
        raise errors.Unauthorized("Token has expired") from None
    except jwt.PyJWTError:
        raise errors.Unauthorized("Invalid token") from None
    if claims.get("type") != expected_type:
        raise errors.Unauthorized(f"An {expected_type} token is required")
    try:
        principal = Principal(
            user_uuid=uuid.UUID(str(claims["sub"])),
            email=str(claims.get("email", "")),
            role=str(claims.get("role", "user")),
        )
        return TokenClaims(
            principal=principal,
            token_type=expected_type,
            session_id=uuid.UUID(str(claims["sid"])),
            jti=uuid.UUID(str(claims["jti"])),
            version=int(claims["ver"]),
        )
    except (ValueError, TypeError):
        raise errors.Unauthorized("Invalid token") from None


def bearer_token(header: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header; 401 without one."""
    if not header:
        raise errors.Unauthorized("Missing Authorization header")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise errors.Unauthorized("Authorization header must be 'Bearer <token>'")
    return token.strip()
