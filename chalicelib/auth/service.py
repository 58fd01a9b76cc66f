"""Accounts: register, sign in, refresh, sign out (one session or all), change the password,
and who-am-I."""

from __future__ import annotations

import uuid

from pydantic import EmailStr, Field, field_validator
from pydantic.networks import validate_email
from pydantic_core import PydanticCustomError
from sqlalchemy import select, update

from chalicelib import limits
from chalicelib.auth import passwords, sessions
from chalicelib.config import get_settings
from chalicelib.core import errors, responses
from chalicelib.core.api import ApiModel, Principal
from chalicelib.db import insert_unique, session_scope
from chalicelib.db.models import User


class RegisterRequest(ApiModel):
    email: EmailStr = Field(max_length=255)
    password: str = Field(min_length=8, max_length=128)
    name: str = Field(min_length=1, max_length=255)

    @field_validator("email", mode="before")
    @classmethod
    def _bare_address(cls, value: object) -> object:
        if isinstance(value, str) and "<" in value:  # EmailStr would keep "x@y" of "Ada <x@y>"
            raise ValueError("must be an address alone, without a name in front")
        return value

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


class PasswordChangeRequest(ApiModel):
    current_password: str = Field(min_length=1, max_length=128)
    new_password: str = Field(min_length=8, max_length=128)


def is_admin(user_uuid: uuid.UUID) -> bool:
    """Admins are named by MAOF_ADMIN_USER_UUIDS, read on every check (no stale role
    claim)."""
    return user_uuid in get_settings().admin_user_uuids


def role_for(user_uuid: uuid.UUID) -> str:
    return "admin" if is_admin(user_uuid) else "user"


def user_view(user: User) -> responses.User:
    return responses.User(
        user_uuid=user.id,
        email=user.email,
        name=user.name,
        role=user.role,
        created_at=user.created_at,
    )


def normalized_email(raw: str) -> str:
    """An address as accounts are stored and found by: what registration's EmailStr makes
    of it (email-validator's normal form: NFC, the domain in Unicode, full-width letters as
    ASCII), lower-cased. Sign-in looks the typed address up in that same form, so the
    exact string someone registered with signs them in; one that is not an address is
    only trimmed and lower-cased (it finds no account)."""
    try:
        return validate_email(raw.strip())[1].lower()
    except PydanticCustomError:
        return raw.strip().lower()


def register(body: RegisterRequest, source_ip: str | None) -> responses.User:
    limits.limit_registrations(source_ip)
    email = normalized_email(str(body.email))
    user = User(
        email=email,
        password_hash=passwords.hash_password(body.password),
        name=body.name,
        role="user",  # an account is named an admin by its UUID, after it exists
    )
    insert_unique(
        user,
        errors.Conflict(
            "A user with this email already exists",
            [{"field": "email", "message": "already registered"}],
        ),
    )
    return user_view(user)


def _signed_in(user: User, pair: dict[str, str]) -> responses.SignedIn:
    return responses.SignedIn(
        access_token=pair["accessToken"], refresh_token=pair["refreshToken"], user=user_view(user)
    )


def _check_password(user: User | None, password: str) -> User:
    """The user, when `password` is theirs; the same 401 for an unknown email."""
    matches = passwords.verify_password(password, user.password_hash if user else None)
    if user is None or not matches:
        raise errors.Unauthorized("Invalid email or password")
    return user


def login(body: LoginRequest, source_ip: str | None) -> responses.SignedIn:
    email = normalized_email(body.email)
    limits.limit_sign_in(email, source_ip)
    with session_scope() as session:
        found = session.scalar(select(User).where(User.email == email))
    user = _check_password(found, body.password)
    with session_scope() as session:
        session.add(user)
        if user.role != role_for(user.id):  # MAOF_ADMIN_USER_UUIDS changed since the last sign-in
            user.role = role_for(user.id)
        pair = sessions.start(session, user)
    return _signed_in(user, pair)


def refresh(body: RefreshRequest) -> responses.SignedIn:
    rotated = sessions.rotate(body.refresh_token)
    return _signed_in(rotated.user, rotated.tokens)


def logout(body: RefreshRequest) -> responses.SessionsEnded:
    """End the session of a refresh token. Always 200: signing out twice, or with an
    expired token, leaves the caller signed out all the same."""
    return responses.SessionsEnded(sessions_ended=sessions.end(body.refresh_token))


def logout_all(principal: Principal) -> responses.SessionsEnded:
    """End every session of the caller, their access tokens included."""
    with session_scope() as session:
        ended = sessions.end_all(session, principal.user_uuid, "logout-all")
    sessions.forget(ended)
    return responses.SessionsEnded(sessions_ended=len(ended))


def change_password(principal: Principal, body: PasswordChangeRequest) -> responses.SignedIn:
    """Set a new password and end every session; the caller gets a fresh one. Of changes
    made at once with the same current password only the first succeeds: the others are
    a 401, that password no longer being the current one."""
    user = _load(principal.user_uuid)
    limits.limit_password_changes(str(user.id))  # a stolen access token must not guess freely
    _check_password(user, body.current_password)
    new_hash = passwords.hash_password(body.new_password)
    with session_scope() as session:
        # Set only over the hash just verified (a concurrent change waits on the row lock,
        # then finds its hash gone); first, so the row is locked before end_all.
        changed = session.scalar(
            update(User)
            .where(User.id == user.id, User.password_hash == user.password_hash)
            .values(password_hash=new_hash)
            .returning(User.id)
        )
        if changed is None:
            raise errors.Unauthorized("Invalid email or password")
        ended = sessions.end_all(session, user.id, "password-changed")
        fresh = session.get(User, user.id, populate_existing=True)
        assert fresh is not None
        pair = sessions.start(session, fresh)
    sessions.forget(ended)
    return _signed_in(fresh, pair)


def _load(user_uuid: uuid.UUID) -> User:
    with session_scope() as session:
        user = session.get(User, user_uuid)
    if user is None:
        raise errors.Unauthorized("User no longer exists")
    return user


def me(principal: Principal) -> responses.User:
    return user_view(_load(principal.user_uuid))
