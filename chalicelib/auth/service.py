"""Register, login, refresh and who-am-I, against the users table."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from pydantic import EmailStr, Field, field_validator
from sqlalchemy import select

from chalicelib import cache, errors
from chalicelib.auth import passwords, tokens
from chalicelib.config import get_settings
from chalicelib.db import insert_unique, session_scope
from chalicelib.db.models import User
from chalicelib.http import ApiModel, Principal


class RegisterRequest(ApiModel):
    email: EmailStr = Field(max_length=255)
    password: str = Field(min_length=8, max_length=128)
    name: str = Field(min_length=1, max_length=255)

    @field_validator("name")
    @classmethod
    def _name_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value.strip()


class LoginRequest(ApiModel):
    email: str = Field(min_length=1, max_length=255)
    password: str = Field(min_length=1, max_length=128)


class RefreshRequest(ApiModel):
    refresh_token: str = Field(min_length=1, max_length=4096)


def user_view(user: User) -> dict[str, Any]:
    return {
        "userUuid": str(user.id),
        "email": user.email,
        "name": user.name,
        "role": user.role,
        "createdAt": user.created_at,
    }


def _principal(user: User) -> Principal:
    return Principal(user_uuid=user.id, email=user.email, role=user.role)


def register(body: RegisterRequest) -> dict[str, Any]:
    user = User(
        email=str(body.email).lower(),
        password_hash=passwords.hash_password(body.password),
        name=body.name,
        role="user",
    )
    insert_unique(
        user,
        errors.Conflict(
            "A user with this email already exists",
            [{"field": "email", "message": "already registered"}],
        ),
    )
    return user_view(user)


LOGIN_WINDOW_SECONDS = 60


def _limit_login_attempts(email: str) -> None:
    """At most MAOF_LOGIN_ATTEMPTS_PER_MINUTE attempts per email a minute (password guessing)."""
    digest = hashlib.sha256(email.encode("utf-8")).hexdigest()[:32]  # no addresses in Redis keys
    attempts = cache.count_in_window(f"maof:ratelimit:login:{digest}", LOGIN_WINDOW_SECONDS)
    limit = get_settings().login_attempts_per_minute
    if attempts is not None and attempts > limit:
        raise errors.RateLimited(
            "Too many sign-in attempts for this account; try again within a minute",
            {"retryAfterSeconds": LOGIN_WINDOW_SECONDS},
        )


def login(body: LoginRequest) -> dict[str, Any]:
    email = body.email.strip().lower()
    _limit_login_attempts(email)
    with session_scope() as session:
        user = session.scalar(select(User).where(User.email == email))
    if (
        not passwords.verify_password(body.password, user.password_hash if user else None)
        or user is None
    ):
        raise errors.Unauthorized("Invalid email or password")
    return {**tokens.token_pair(_principal(user)), "user": user_view(user)}


def _load(user_uuid: uuid.UUID) -> User:
    with session_scope() as session:
        user = session.get(User, user_uuid)
    if user is None:
        raise errors.Unauthorized("User no longer exists")
    return user


def refresh(body: RefreshRequest) -> dict[str, Any]:
    principal = tokens.decode(body.refresh_token, "refresh")
    user = _load(principal.user_uuid)
    return {**tokens.token_pair(_principal(user)), "user": user_view(user)}


def me(principal: Principal) -> dict[str, Any]:
    return user_view(_load(principal.user_uuid))
