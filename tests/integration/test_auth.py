"""POST /auth/register, /auth/login, /auth/refresh and GET /auth/me over HTTP."""

from __future__ import annotations

import time
import unicodedata
import uuid
from typing import Any

import jwt
import pytest

from chalicelib.auth.tokens import key_id
from chalicelib.config import DEV_JWT_SECRET, get_settings
from tests.integration.conftest import Api, unique_email

PASSWORD = "correct-horse-battery"
USER_FIELDS = {"userUuid", "email", "name", "role", "createdAt"}


def register(api: Api, **overrides: Any) -> Any:
    body = {"email": unique_email(), "password": PASSWORD, "name": "Ada Lovelace", **overrides}
    return api.post("/auth/register", body)


def error_of(response: Any, status: int, code: str) -> dict[str, Any]:
    """The error object of an envelope, after checking status, shape and code."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["success"] is False
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert body["error"]["requestId"] == response.headers["X-Request-Id"]
    return dict(body["error"])


def fields_named(error: dict[str, Any]) -> set[str]:
    return {item["field"] for item in error.get("details") or []}


def login(api: Api, email: str, password: str = PASSWORD) -> dict[str, Any]:
    response = api.post("/auth/login", {"email": email, "password": password})
    assert response.status_code == 200, response.text
    return dict(response.json()["data"])


def craft_token(
    sub: str,
    token_type: str = "access",
    *,
    key: str | None = DEV_JWT_SECRET,
    algorithm: str = "HS256",
    iat: int | None = None,
    exp: int | None = None,
    like: str | None = None,
) -> str:
    """A token signed by hand; its session claims (sid, jti, ver) are copied from the real
    token `like` (so only the property under test differs), else made up."""
    now = int(time.time())
    real = jwt.decode(like, options={"verify_signature": False}) if like else {}
    claims = {
        "sub": sub,
        "email": "someone@example.com",
        "role": "user",
        "type": token_type,
        "iat": now if iat is None else iat,
        "exp": now + 600 if exp is None else exp,
        "sid": real.get("sid", uuid.uuid4().hex),
        "jti": real.get("jti", uuid.uuid4().hex),
        "ver": real.get("ver", 0),
    }
    return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": key_id(DEV_JWT_SECRET)})


def me_with(api: Api, token: str) -> Any:
    return api.get("/auth/me", headers={"Authorization": f"Bearer {token}"})


def test_tests_sign_with_the_dev_secret_because_the_stage_is_test() -> None:
    assert get_settings().stage == "test"
    assert get_settings().jwt_secret == DEV_JWT_SECRET


# ------------------------------------------------------------------ register


def test_register_returns_201_with_the_user(api: Api) -> None:
    email = unique_email()
    response = register(api, email=email, name="Ada Lovelace")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["success"] is True
    user = body["data"]
    assert set(user) == USER_FIELDS
    assert user["email"] == email
    assert user["name"] == "Ada Lovelace"
    assert user["role"] == "user"
    uuid.UUID(user["userUuid"])
    assert user["createdAt"]


def test_register_never_returns_the_password_or_its_hash(api: Api) -> None:
    response = register(api)
    assert response.status_code == 201
    assert PASSWORD not in response.text
    assert "password" not in response.text.lower()
    assert "$2b$" not in response.text


def test_register_stores_the_email_lower_case(api: Api) -> None:
    email = unique_email()
    response = register(api, email=email.upper().replace("@EXAMPLE.COM", "@Example.Com"))
    assert response.status_code == 201, response.text
    assert response.json()["data"]["email"] == email
    assert login(api, email)["user"]["email"] == email


@pytest.mark.parametrize(
    ("typed", "stored"),
    [
        ("jose\u0301{}@example.com", "jos\u00e9{}@example.com"),  # e + combining accent (NFD)
        ("{}@xn--bcher-kva.de", "{}@b\u00fccher.de"),  # the domain in its ASCII form
        ("{}@\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com", "{}@example.com"),  # full width
    ],
    ids=["decomposed accent", "punycode domain", "full-width domain"],
)
def test_the_exact_address_someone_registered_with_signs_them_in(
    api: Api, typed: str, stored: str
) -> None:
    """Registration stores an address in email-validator's normal form; sign-in used to
    look up what was typed merely lower-cased, so these accounts could never sign in."""
    local = uuid.uuid4().hex[:8]
    response = register(api, email=typed.format(local))
    assert response.status_code == 201, response.text
    assert response.json()["data"]["email"] == stored.format(local)
    assert login(api, typed.format(local))["user"]["email"] == stored.format(local)
    assert login(api, stored.format(local).upper())["user"]["email"] == stored.format(local)


def test_an_address_with_a_name_in_front_is_400(api: Api) -> None:
    """ "Ada <ada@example.com>" was stored as ada@example.com: what was sent is refused."""
    error = error_of(register(api, email=f"Ada <{unique_email()}>"), 400, "VALIDATION_ERROR")
    assert fields_named(error) == {"email"}


def test_register_twice_with_the_same_email_is_409_conflict(api: Api) -> None:
    email = unique_email()
    assert register(api, email=email).status_code == 201
    error = error_of(register(api, email=email), 409, "CONFLICT")
    assert fields_named(error) == {"email"}


def test_register_email_uniqueness_ignores_case(api: Api) -> None:
    local = f"Case-{uuid.uuid4().hex[:8]}"
    assert register(api, email=f"{local}@Example.com").status_code == 201
    error_of(register(api, email=f"{local.lower()}@example.com"), 409, "CONFLICT")


@pytest.mark.parametrize("field", ["email", "password", "name"])
def test_register_without_a_field_is_400_naming_that_field(api: Api, field: str) -> None:
    body = {"email": unique_email(), "password": PASSWORD, "name": "Ada"}
    del body[field]
    error = error_of(api.post("/auth/register", body), 400, "VALIDATION_ERROR")
    assert fields_named(error) == {field}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("email", "not-an-email"),
        ("email", ""),
        ("email", 42),
        ("email", None),
        ("email", "a" * 64 + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 63 + ".com"),
        ("password", "short7!"),
        ("password", "p" * 129),
        ("password", 12345678),
        ("password", None),
        ("name", ""),
        ("name", "   "),
        ("name", "n" * 256),
        ("name", ["Ada"]),
    ],
    ids=lambda value: repr(value)[:20],
)
def test_register_with_an_invalid_field_is_400_naming_that_field(
    api: Api, field: str, value: Any
) -> None:
    body: dict[str, Any] = {"email": unique_email(), "password": PASSWORD, "name": "Ada"}
    body[field] = value
    error = error_of(api.post("/auth/register", body), 400, "VALIDATION_ERROR")
    assert fields_named(error) == {field}


def test_register_email_longer_than_255_characters_is_refused(api: Api) -> None:
    email = "a" * 60 + "@" + ".".join(["b" * 60] * 4) + ".com"
    assert len(email) > 255
    error = error_of(register(api, email=email), 400, "VALIDATION_ERROR")
    assert fields_named(error) == {"email"}


def test_register_accepts_the_password_and_name_length_bounds(api: Api) -> None:
    assert register(api, password="p" * 8, name="n").status_code == 201
    assert register(api, password="p" * 128, name="n" * 255).status_code == 201


def test_register_with_an_unknown_field_is_400_naming_it(api: Api) -> None:
    response = register(api, role="admin")
    error = error_of(response, 400, "VALIDATION_ERROR")
    assert fields_named(error) == {"role"}


def test_register_reports_every_invalid_field(api: Api) -> None:
    body = {"email": "nope", "password": "short", "name": "", "extra": 1}
    error = error_of(api.post("/auth/register", body), 400, "VALIDATION_ERROR")
    assert fields_named(error) == {"email", "password", "name", "extra"}


# ------------------------------------------------------------------ login


def test_login_returns_a_token_pair_and_the_user(api: Api) -> None:
    email = unique_email()
    created = register(api, email=email).json()["data"]
    data = login(api, email)
    assert set(data) == {"accessToken", "refreshToken", "user"}
    assert data["user"] == created


def test_login_ignores_the_case_of_the_email(api: Api) -> None:
    email = unique_email()
    register(api, email=email)
    assert login(api, email.upper())["user"]["email"] == email


def test_a_password_typed_in_another_unicode_normal_form_signs_in(api: Api) -> None:
    """Some platforms and input methods send "é" as "e" and a combining accent (NFD)."""
    email, password = unique_email(), "caf\u00e9-cr\u00e8me-br\u00fbl\u00e9e"
    assert register(api, email=email, password=password).status_code == 201
    login(api, email, unicodedata.normalize("NFD", password))
    wrong = api.post("/auth/login", {"email": email, "password": "cafe-creme-brulee"})
    assert wrong.status_code == 401


def test_login_tokens_are_hs256_jwts_with_the_contract_claims(api: Api) -> None:
    email = unique_email()
    user = register(api, email=email).json()["data"]
    data = login(api, email)
    for kind in ("access", "refresh"):
        token = data[f"{kind}Token"]
        assert jwt.get_unverified_header(token)["alg"] == "HS256"
        claims = jwt.decode(token, DEV_JWT_SECRET, algorithms=["HS256"])
        assert claims["sub"] == user["userUuid"]
        assert claims["email"] == email
        assert claims["role"] == "user"
        assert claims["type"] == kind
        assert claims["exp"] > claims["iat"]
    settings = get_settings()
    access = jwt.decode(data["accessToken"], DEV_JWT_SECRET, algorithms=["HS256"])
    assert access["exp"] - access["iat"] == settings.access_token_ttl_seconds
    refresh = jwt.decode(data["refreshToken"], DEV_JWT_SECRET, algorithms=["HS256"])
    assert refresh["exp"] - refresh["iat"] == settings.refresh_token_ttl_seconds


def test_wrong_password_and_unknown_email_give_the_same_401(api: Api) -> None:
    email = unique_email()
    register(api, email=email)
    wrong_password = api.post("/auth/login", {"email": email, "password": "wrong-password"})
    unknown_email = api.post("/auth/login", {"email": unique_email(), "password": PASSWORD})
    first = error_of(wrong_password, 401, "UNAUTHORIZED")
    second = error_of(unknown_email, 401, "UNAUTHORIZED")
    assert first["message"] == second["message"]
    assert first.get("details") == second.get("details")


@pytest.mark.parametrize("field", ["email", "password"])
def test_login_without_a_field_is_400_naming_that_field(api: Api, field: str) -> None:
    body = {"email": unique_email(), "password": PASSWORD}
    del body[field]
    error = error_of(api.post("/auth/login", body), 400, "VALIDATION_ERROR")
    assert fields_named(error) == {field}


def test_login_with_an_unknown_field_is_400_naming_it(api: Api) -> None:
    body = {"email": unique_email(), "password": PASSWORD, "remember": True}
    error = error_of(api.post("/auth/login", body), 400, "VALIDATION_ERROR")
    assert fields_named(error) == {"remember"}


# ------------------------------------------------------------------ refresh


def test_refresh_returns_a_new_pair_that_works(api: Api) -> None:
    email = unique_email()
    register(api, email=email)
    first = login(api, email)
    response = api.post("/auth/refresh", {"refreshToken": first["refreshToken"]})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert {"accessToken", "refreshToken"} <= set(data)
    assert data["accessToken"] != first["accessToken"]
    assert data["refreshToken"] != first["refreshToken"]
    assert jwt.decode(data["refreshToken"], DEV_JWT_SECRET, algorithms=["HS256"])["type"] == (
        "refresh"
    )
    me = me_with(api, data["accessToken"])
    assert me.status_code == 200, me.text
    assert me.json()["data"]["email"] == email


def test_refresh_with_an_access_token_is_401(user: Api) -> None:
    error_of(user.post("/auth/refresh", {"refreshToken": user.token}), 401, "UNAUTHORIZED")


def test_refresh_with_an_expired_refresh_token_is_401(user: Api) -> None:
    assert user.user is not None
    now = int(time.time())
    token = craft_token(user.user["userUuid"], "refresh", iat=now - 120, exp=now - 60)
    error_of(user.post("/auth/refresh", {"refreshToken": token}), 401, "UNAUTHORIZED")


@pytest.mark.parametrize("garbage", ["garbage", "a.b.c", "x" * 4096])
def test_refresh_with_a_garbage_token_is_401(api: Api, garbage: str) -> None:
    error_of(api.post("/auth/refresh", {"refreshToken": garbage}), 401, "UNAUTHORIZED")


def test_refresh_with_an_alg_none_token_is_401(user: Api) -> None:
    assert user.user is not None
    token = craft_token(user.user["userUuid"], "refresh", key=None, algorithm="none")
    assert jwt.get_unverified_header(token)["alg"] == "none"
    error_of(user.post("/auth/refresh", {"refreshToken": token}), 401, "UNAUTHORIZED")


def test_refresh_with_a_token_signed_with_another_secret_is_401(user: Api) -> None:
    assert user.user is not None
    token = craft_token(user.user["userUuid"], "refresh", key="another-secret-" + "x" * 32)
    error_of(user.post("/auth/refresh", {"refreshToken": token}), 401, "UNAUTHORIZED")


def test_refresh_without_a_token_is_400_naming_it(api: Api) -> None:
    error = error_of(api.post("/auth/refresh", {}), 400, "VALIDATION_ERROR")
    assert fields_named(error) == {"refreshToken"}


def test_a_crafted_refresh_token_with_the_right_secret_is_accepted(api: Api) -> None:
    """The control for the refusals above: only the property under test differs."""
    email = unique_email()
    assert register(api, email=email).status_code == 201
    signed_in = login(api, email)
    token = craft_token(signed_in["user"]["userUuid"], "refresh", like=signed_in["refreshToken"])
    assert api.post("/auth/refresh", {"refreshToken": token}).status_code == 200


# ------------------------------------------------------------------ me


def test_me_returns_the_signed_in_user(user: Api) -> None:
    response = user.get("/auth/me")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True
    assert body["data"] == user.user
    assert set(body["data"]) == USER_FIELDS


def test_me_without_an_authorization_header_is_401(api: Api) -> None:
    error_of(api.get("/auth/me"), 401, "UNAUTHORIZED")


@pytest.mark.parametrize("header", ["Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Token abc"])
def test_me_with_a_malformed_authorization_header_is_401(api: Api, header: str) -> None:
    error_of(api.get("/auth/me", headers={"Authorization": header}), 401, "UNAUTHORIZED")


def test_me_with_a_refresh_token_is_401(api: Api) -> None:
    email = unique_email()
    register(api, email=email)
    error_of(me_with(api, login(api, email)["refreshToken"]), 401, "UNAUTHORIZED")


def test_me_with_an_expired_access_token_is_401(user: Api) -> None:
    assert user.user is not None
    now = int(time.time())
    token = craft_token(user.user["userUuid"], iat=now - 120, exp=now - 1)
    error_of(me_with(user, token), 401, "UNAUTHORIZED")


def test_me_with_an_alg_none_token_is_401(user: Api) -> None:
    assert user.user is not None
    token = craft_token(user.user["userUuid"], key=None, algorithm="none")
    error_of(me_with(user, token), 401, "UNAUTHORIZED")


def test_me_with_a_token_signed_with_another_secret_is_401(user: Api) -> None:
    assert user.user is not None
    token = craft_token(user.user["userUuid"], key="another-secret-" + "x" * 32)
    error_of(me_with(user, token), 401, "UNAUTHORIZED")


def test_me_with_a_garbage_token_is_401(api: Api) -> None:
    error_of(me_with(api, "not.a.jwt"), 401, "UNAUTHORIZED")


def test_me_with_a_token_for_no_user_is_401(api: Api) -> None:
    error_of(me_with(api, craft_token(str(uuid.uuid4()))), 401, "UNAUTHORIZED")


def test_me_with_a_token_whose_subject_is_not_a_uuid_is_401(api: Api) -> None:
    error_of(me_with(api, craft_token("not-a-uuid")), 401, "UNAUTHORIZED")


def test_a_crafted_access_token_with_the_right_secret_is_accepted(user: Api) -> None:
    """The control for the refusals above: only the property under test differs."""
    assert user.user is not None
    response = me_with(user, craft_token(user.user["userUuid"], like=user.token))
    assert response.status_code == 200, response.text
    assert response.json()["data"]["userUuid"] == user.user["userUuid"]
