"""Tokens: HS256 pinned, a key id in every header, the type claim checked, every other
token refused with a 401; the signing secret rotates without refusing its previous tokens."""

from __future__ import annotations

import time
import unicodedata
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import jwt
import pytest

from chalicelib.auth import tokens
from chalicelib.config import DEV_JWT_SECRET, get_settings, reset_settings
from chalicelib.core import errors
from chalicelib.core.api import Principal

PRINCIPAL = Principal(user_uuid=uuid.uuid4(), email="ada@example.com", role="user")
SESSION = uuid.uuid4()
DEV_KID = tokens.key_id(DEV_JWT_SECRET)


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": str(PRINCIPAL.user_uuid),
        "email": PRINCIPAL.email,
        "role": PRINCIPAL.role,
        "type": "access",
        "iat": now,
        "exp": now + 600,
        "jti": uuid.uuid4().hex,
        "sid": SESSION.hex,
        "ver": 0,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(
    payload: dict[str, Any],
    key: str | None = DEV_JWT_SECRET,
    algorithm: str = "HS256",
    kid: str | None = DEV_KID,
) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyJWT may warn about the key length for HS512
        headers = {"kid": kid} if kid is not None else None
        return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


def issue(kind: str, **extra: Any) -> str:
    return tokens.issue(PRINCIPAL, kind, session_id=SESSION, version=0, **extra)


def refused(token: str, expected_type: str = "access") -> str:
    with pytest.raises(errors.Unauthorized) as caught:
        tokens.decode(token, expected_type)
    assert caught.value.status == 401
    assert caught.value.code == "UNAUTHORIZED"
    return caught.value.message


def test_the_test_stage_signs_with_the_dev_secret() -> None:
    assert get_settings().jwt_secret == DEV_JWT_SECRET


@pytest.mark.parametrize("kind", ["access", "refresh"])
def test_an_issued_token_is_an_hs256_jwt_with_the_contract_claims(kind: str) -> None:
    token = issue(kind)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "HS256"
    assert header["kid"] == DEV_KID
    assert DEV_JWT_SECRET not in header["kid"]
    decoded = jwt.decode(token, DEV_JWT_SECRET, algorithms=["HS256"])
    assert {"sub", "email", "role", "type", "iat", "exp", "jti", "sid", "ver"} <= set(decoded)
    assert decoded["sid"] == SESSION.hex
    assert decoded["sub"] == str(PRINCIPAL.user_uuid)
    assert decoded["email"] == PRINCIPAL.email
    assert decoded["role"] == PRINCIPAL.role
    assert decoded["type"] == kind
    ttl = (
        get_settings().access_token_ttl_seconds
        if kind == "access"
        else get_settings().refresh_token_ttl_seconds
    )
    assert decoded["exp"] - decoded["iat"] == ttl


@pytest.mark.parametrize("kind", ["access", "refresh"])
def test_an_issued_token_decodes_to_its_principal_session_and_version(kind: str) -> None:
    jti = uuid.uuid4()
    decoded = tokens.decode(issue(kind, jti=jti), kind)
    assert decoded.principal == PRINCIPAL
    assert (decoded.session_id, decoded.jti, decoded.version) == (SESSION, jti, 0)


def test_a_token_never_outlives_its_session() -> None:
    not_after = int(time.time()) + 30
    decoded = jwt.decode(
        issue("refresh", not_after=not_after), DEV_JWT_SECRET, algorithms=["HS256"]
    )
    assert decoded["exp"] == not_after


def test_two_tokens_issued_in_the_same_second_differ() -> None:
    assert issue("access") != issue("access")


def test_a_crafted_hs256_token_is_accepted() -> None:
    """The control for the refusals below: only the property under test differs."""
    assert tokens.decode(sign(claims()), "access").principal == PRINCIPAL


# ------------------------------------------------------------------ key rotation


@pytest.fixture
def rotated(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """MAOF_JWT_SECRET replaced by a new one; the dev secret is now a previous one."""
    new = "n" * 40
    monkeypatch.setenv("MAOF_JWT_SECRET", new)
    monkeypatch.setenv("MAOF_JWT_PREVIOUS_SECRETS", DEV_JWT_SECRET)
    reset_settings()
    yield new
    monkeypatch.undo()
    reset_settings()


def test_tokens_of_the_previous_secret_still_verify_after_a_rotation(rotated: str) -> None:
    old = sign(claims())
    assert tokens.decode(old, "access").principal == PRINCIPAL
    fresh = issue("access")
    assert jwt.get_unverified_header(fresh)["kid"] == tokens.key_id(rotated)
    assert tokens.decode(fresh, "access").principal == PRINCIPAL


def test_tokens_of_a_retired_secret_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    old = sign(claims())
    monkeypatch.setenv("MAOF_JWT_SECRET", "n" * 40)
    reset_settings()
    try:
        refused(old)
    finally:
        monkeypatch.undo()
        reset_settings()


def test_a_token_naming_an_unknown_key_or_no_key_is_refused() -> None:
    refused(sign(claims(), kid="0123456789abcdef"))
    refused(sign(claims(), kid=None))


# ------------------------------------------------------------------ the algorithm is pinned


@pytest.mark.parametrize("algorithm", ["HS384", "HS512"])
def test_a_token_signed_with_another_hmac_algorithm_is_refused(algorithm: str) -> None:
    refused(sign(claims(), algorithm=algorithm))


def test_an_alg_none_token_is_refused() -> None:
    token = sign(claims(), key=None, algorithm="none")
    assert jwt.get_unverified_header(token)["alg"] == "none"
    refused(token)


def test_an_alg_none_token_with_the_signature_stripped_of_a_valid_one_is_refused() -> None:
    valid = sign(claims())
    forged_header = sign(claims(), key=None, algorithm="none").split(".")[0]
    _, payload, signature = valid.split(".")
    refused(f"{forged_header}.{payload}.{signature}")
    refused(f"{forged_header}.{payload}.")


def test_a_token_signed_with_another_secret_is_refused() -> None:
    refused(sign(claims(), key="another-secret-that-is-long-enough-0123"))


def test_a_token_with_a_tampered_payload_is_refused() -> None:
    header, _, signature = sign(claims()).split(".")
    other = sign(claims(role="admin")).split(".")[1]
    refused(f"{header}.{other}.{signature}")


# ------------------------------------------------------------------ the type claim


def test_a_refresh_token_is_refused_where_an_access_token_is_required() -> None:
    refused(issue("refresh"), "access")


def test_an_access_token_is_refused_where_a_refresh_token_is_required() -> None:
    refused(issue("access"), "refresh")


@pytest.mark.parametrize("kind", ["admin", "", "ACCESS", 1])
def test_a_token_of_an_unknown_type_is_refused(kind: Any) -> None:
    refused(sign(claims(type=kind)))


# ------------------------------------------------------------------ the other claims


def test_an_expired_token_is_refused() -> None:
    """Past its expiry by more than the clocks' allowance (tokens.CLOCK_LEEWAY_SECONDS)."""
    now = int(time.time())
    late = tokens.CLOCK_LEEWAY_SECONDS + 1
    message = refused(sign(claims(iat=now - 120 - late, exp=now - late)))
    assert "expired" in message.lower()


def test_a_token_issued_on_a_host_a_little_ahead_is_accepted() -> None:
    """Its `iat` seconds in this host's future (the issuing host's clock ahead)."""
    now = int(time.time())
    assert tokens.decode(sign(claims(iat=now + 5, exp=now + 600)), tokens.ACCESS)


@pytest.mark.parametrize("claim", ["sub", "type", "exp", "iat", "jti", "sid", "ver"])
def test_a_token_without_a_required_claim_is_refused(claim: str) -> None:
    payload = claims()
    del payload[claim]
    refused(sign(payload))


@pytest.mark.parametrize("sub", ["not-a-uuid", "", "123"])
def test_a_token_whose_subject_is_not_a_uuid_is_refused(sub: str) -> None:
    refused(sign(claims(sub=sub)))


@pytest.mark.parametrize("field", ["sid", "jti", "ver"])
def test_a_token_with_a_malformed_session_claim_is_refused(field: str) -> None:
    refused(sign(claims(**{field: "not-a-uuid-or-number"})))


@pytest.mark.parametrize("token", ["", "garbage", "a.b.c", "a.b", "..."])
def test_garbage_is_refused(token: str) -> None:
    refused(token)


# ------------------------------------------------------------------ the Authorization header


def test_a_bearer_header_gives_its_token() -> None:
    assert tokens.bearer_token("Bearer abc.def.ghi") == "abc.def.ghi"
    assert tokens.bearer_token("bearer  abc ") == "abc"


@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Token abc", "abc"]
)
def test_a_missing_or_malformed_authorization_header_is_refused(header: str | None) -> None:
    with pytest.raises(errors.Unauthorized):
        tokens.bearer_token(header)


def test_passwords_longer_than_72_bytes_count_every_character():
    from chalicelib.auth.passwords import hash_password, verify_password

    long = "p" * 100
    hashed = hash_password(long, rounds=4)
    assert verify_password(long, hashed)
    assert not verify_password("p" * 72 + "q" * 28, hashed)


CREME_BRULEE_NFC = "cr\u00e8me-br\u00fbl\u00e9e"  # è, û, é each one character


@pytest.mark.parametrize(
    ("registered", "typed"),
    [
        (CREME_BRULEE_NFC, unicodedata.normalize("NFD", CREME_BRULEE_NFC)),  # e + combining
        (unicodedata.normalize("NFD", CREME_BRULEE_NFC), CREME_BRULEE_NFC),
        ("\uff50\uff41\uff53\uff53\uff57\uff4f\uff52\uff44", "password"),  # full-width letters
    ],
)
def test_a_password_typed_in_another_unicode_form_matches(registered: str, typed: str) -> None:
    """NIST SP 800-63B: passwords are compared NFKC-normalised, as platforms and input
    methods send the same typed text in different forms."""
    from chalicelib.auth.passwords import hash_password, verify_password

    hashed = hash_password(registered, rounds=4)
    assert verify_password(typed, hashed)
    assert verify_password(registered, hashed)
    assert not verify_password(typed + "x", hashed)


def test_a_hash_made_before_normalisation_still_matches_the_password_as_typed() -> None:
    """Hashes made before passwords were normalised are of the password as it was sent."""
    import bcrypt

    from chalicelib.auth import passwords

    as_sent = unicodedata.normalize("NFD", CREME_BRULEE_NFC)
    legacy = bcrypt.hashpw(passwords._prehash(as_sent), bcrypt.gensalt(rounds=4)).decode()
    assert passwords.verify_password(as_sent, legacy)
    assert not passwords.verify_password(as_sent + "x", legacy)
    assert not passwords.verify_password(as_sent, None)
