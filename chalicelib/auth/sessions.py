"""Sign-in sessions: refresh-token rotation with reuse detection, sign-out, and the check
that an access token's session is still live.

A session is one row of `auth_sessions`: a family of refresh tokens of which only the
newest (`current_jti`) is valid. Refreshing swaps it for a new one in a single conditional
UPDATE; presenting any other token of the family means a copy is in someone else's hands,
so the whole family is revoked, the newest token included. A session ends at the latest
MAOF_SESSION_MAX_LIFETIME_SECONDS after sign-in, however often it is refreshed.

Access tokens carry their session id and the user's token version; each request checks
both against Postgres through a short Redis cache in which every sign-out marks its
sessions ended, so a sign-out ends the session's access tokens too (at once; within
CACHE_SECONDS if Redis could not be written at that moment). A request caches what it
read only where nothing is cached (SET NX): one that read a session as live just before
its sign-out cannot write that over the sign-out's mark.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from sqlalchemy import text
from sqlalchemy.orm import Session

from chalicelib import cache
from chalicelib.auth import tokens
from chalicelib.config import get_settings
from chalicelib.core import errors
from chalicelib.core.api import Principal
from chalicelib.db import session_scope
from chalicelib.db.models import AuthSession, User

CACHE_SECONDS = 30
ENDED = {"live": False, "version": None}


def principal_of(user: User) -> Principal:
    return Principal(user_uuid=user.id, email=user.email, role=user.role)


def _live_key(session_id: uuid.UUID) -> str:
    return f"maof:auth:session:{session_id.hex}"


def _pair(
    user: User, session_id: uuid.UUID, jti: uuid.UUID, expires_at: datetime
) -> dict[str, str]:
    principal = principal_of(user)
    version = user.token_version
    return {
        "accessToken": tokens.issue(
            principal,
            tokens.ACCESS,
            session_id=session_id,
            version=version,
            not_after=int(expires_at.timestamp()),
        ),
        "refreshToken": tokens.issue(
            principal,
            tokens.REFRESH,
            session_id=session_id,
            version=version,
            jti=jti,
            not_after=int(expires_at.timestamp()),
        ),
    }


def start(session: Session, user: User) -> dict[str, str]:
    """A new session for `user` (in the caller's transaction) and its first token pair."""
    session_id, jti = uuid.uuid4(), uuid.uuid4()
    expires_at = datetime.now(UTC) + timedelta(seconds=get_settings().session_max_lifetime_seconds)
    session.add(AuthSession(id=session_id, user_id=user.id, current_jti=jti, expires_at=expires_at))
    session.flush()
    return _pair(user, session_id, jti, expires_at)


@dataclass(frozen=True)
class Rotated:
    user: User
    tokens: dict[str, str]


def rotate(refresh_token: str) -> Rotated:
    """New tokens for the newest refresh token of a live session; 401 otherwise, and a
    reused (already rotated) token revokes its whole family before answering 401."""
    claims = tokens.decode(refresh_token, tokens.REFRESH)
    new_jti = uuid.uuid4()
    with session_scope() as session:
        row = session.execute(
            text(
                """
                UPDATE auth_sessions SET current_jti = :new_jti, refreshed_at = now()
                 WHERE id = :sid AND user_id = :user_id AND current_jti = :jti
                   AND revoked_at IS NULL AND expires_at > now()
                   AND EXISTS (SELECT 1 FROM users WHERE id = :user_id AND token_version = :ver)
             RETURNING expires_at
                """
            ),
            {
                "sid": claims.session_id,
                "user_id": claims.principal.user_uuid,
                "jti": claims.jti,
                "new_jti": new_jti,
                "ver": claims.version,
            },
        ).first()
        user = session.get(User, claims.principal.user_uuid) if row is not None else None
        if row is not None and user is not None:
            return Rotated(user, _pair(user, claims.session_id, new_jti, row.expires_at))
    reused = _revoke(
        "id = :sid AND user_id = :user_id AND current_jti <> :jti",
        {"sid": claims.session_id, "user_id": claims.principal.user_uuid, "jti": claims.jti},
        reason="reuse",
    )
    if reused:
        raise errors.Unauthorized("This refresh token was already used; the session has ended")
    raise errors.Unauthorized("The session has ended; sign in again")


def _revoke(condition: str, params: dict[str, Any], *, reason: str) -> int:
    """Revoke the live sessions matching `condition`, and forget them in the cache."""
    with session_scope() as session:
        ended = session.execute(
            text(
                "UPDATE auth_sessions SET revoked_at = now(), revoked_reason = :reason "
                f"WHERE revoked_at IS NULL AND {condition} RETURNING id"
            ),
            {**params, "reason": reason},
        ).scalars()
        ids = list(ended)
    forget(ids)
    return len(ids)


def end(refresh_token: str) -> int:
    """Sign out the session of a refresh token (however old, even expired): 0 or 1 ended."""
    claims: tokens.TokenClaims | None
    try:
        claims = tokens.decode(refresh_token, tokens.REFRESH)
    except errors.Unauthorized:
        claims = _expired_claims(refresh_token)
    if claims is None:
        return 0
    return _revoke(
        "id = :sid AND user_id = :user_id",
        {"sid": claims.session_id, "user_id": claims.principal.user_uuid},
        reason="logout",
    )


def _expired_claims(refresh_token: str) -> tokens.TokenClaims | None:
    """The claims of a correctly signed refresh token that has merely expired."""
    current, previous = tokens.secrets()
    for secret in (current, *previous):
        try:
            raw = jwt.decode(
                refresh_token,
                secret,
                algorithms=[tokens.ALGORITHM],
                # Only the signature matters here: a token issued on a host whose clock is
                # ahead (its `iat` in our future) still names the session to end.
                options={
                    "verify_exp": False,
                    "verify_iat": False,
                    "require": ["sub", "sid", "jti", "type"],
                },
            )
        except jwt.PyJWTError:
            continue
        if raw.get("type") != tokens.REFRESH:
            return None
        try:
            return tokens.TokenClaims(
                principal=Principal(uuid.UUID(str(raw["sub"])), "", ""),
                token_type=tokens.REFRESH,
                session_id=uuid.UUID(str(raw["sid"])),
                jti=uuid.UUID(str(raw["jti"])),
                version=int(raw.get("ver", 0)),
            )
        except (ValueError, TypeError):
            return None
    return None


def end_all(session: Session, user_id: uuid.UUID, reason: str) -> list[uuid.UUID]:
    """In the caller's transaction: bump the user's token version (every access token dies)
    and revoke every live session. The caller marks them ended in the cache after commit
    (forget)."""
    session.execute(
        text(
            "UPDATE users SET token_version = token_version + 1, updated_at = now() "
            "WHERE id = :user_id"
        ),
        {"user_id": user_id},
    )
    return list(
        session.execute(
            text(
                "UPDATE auth_sessions SET revoked_at = now(), revoked_reason = :reason "
                "WHERE user_id = :user_id AND revoked_at IS NULL RETURNING id"
            ),
            {"user_id": user_id, "reason": reason},
        ).scalars()
    )


def forget(session_ids: list[uuid.UUID]) -> None:
    """Mark ended sessions so in the cache (a session never comes back to life)."""
    cache.set_json_many([_live_key(i) for i in session_ids], ENDED, CACHE_SECONDS)


def authenticate(header: str | None) -> Principal:
    """The caller behind `Authorization: Bearer <access token>`, whose session is live."""
    claims = tokens.decode(tokens.bearer_token(header), tokens.ACCESS)
    key = _live_key(claims.session_id)
    state = cache.get_json(key)
    if not isinstance(state, dict):
        state = _session_state(claims)
        cache.set_json(key, state, CACHE_SECONDS, if_absent=True)
    if not state.get("live") or state.get("version") != claims.version:
        raise errors.Unauthorized("The session has ended; sign in again")
    return claims.principal


def _session_state(claims: tokens.TokenClaims) -> dict[str, Any]:
    with session_scope() as session:
        row = session.execute(
            text(
                "SELECT u.token_version, s.revoked_at IS NULL AND s.expires_at > now() AS live "
                "FROM auth_sessions AS s JOIN users AS u ON u.id = s.user_id "
                "WHERE s.id = :sid AND s.user_id = :user_id"
            ),
            {"sid": claims.session_id, "user_id": claims.principal.user_uuid},
        ).first()
    if row is None:
        return ENDED
    return {"live": bool(row.live), "version": int(row.token_version)}
