"""HS256 JWTs: issue access/refresh pairs, and authenticate a bearer token."""

from __future__ import annotations

import time
import uuid
from typing import Any

import jwt

from chalicelib import errors
from chalicelib.config import get_settings
from chalicelib.http import Principal

ALGORITHM = "HS256"


def issue(principal: Principal, token_type: str) -> str:
    settings = get_settings()
    ttl = (
        settings.access_token_ttl_seconds
        if token_type == "access"  # noqa: S105 (a token kind, not a secret)
        else settings.refresh_token_ttl_seconds
    )
    now = int(time.time())
    claims = {
        "sub": str(principal.user_uuid),
        "email": principal.email,
        "role": principal.role,
        "type": token_type,
        "iat": now,
        "exp": now + ttl,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, settings.jwt_secret, algorithm=ALGORITHM)


def token_pair(principal: Principal) -> dict[str, str]:
    return {"accessToken": issue(principal, "access"), "refreshToken": issue(principal, "refresh")}


def decode(token: str, expected_type: str) -> Principal:
    """The principal of a valid token of `expected_type`; 401 for anything else."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            get_settings().jwt_secret,
            algorithms=[ALGORITHM],  # pinned: `alg: none` and key confusion are refused
            options={"require": ["sub", "type", "exp", "iat"]},
        )
    except jwt.ExpiredSignatureError:
        raise errors.Unauthorized("Token has expired") from None
    except jwt.PyJWTError:
        raise errors.Unauthorized("Invalid token") from None
    if claims.get("type") != expected_type:
        raise errors.Unauthorized(f"An {expected_type} token is required")
    try:
        user_uuid = uuid.UUID(str(claims["sub"]))
    except ValueError:
        raise errors.Unauthorized("Invalid token") from None
    return Principal(
        user_uuid=user_uuid,
        email=str(claims.get("email", "")),
        role=str(claims.get("role", "user")),
    )


def authenticate(header: str | None) -> Principal:
    """The caller behind an `Authorization: Bearer <access token>` header."""
    if not header:
        raise errors.Unauthorized("Missing Authorization header")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise errors.Unauthorized("Authorization header must be 'Bearer <token>'")
    return decode(token.strip(), "access")
