"""Sessions end when they should: refresh tokens rotate and a reused one revokes its whole
family; sign-out, sign-out-everywhere and a password change end sessions, access tokens
included; a session ends at its absolute lifetime; the JWT and agent-token keys rotate
without signing anyone out or losing an agent."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import jwt
import pytest
from sqlalchemy import text

from chalicelib import db
from chalicelib.agents import secrets
from chalicelib.auth import passwords
from chalicelib.auth import sessions as auth_sessions
from chalicelib.auth.tokens import key_id
from chalicelib.config import DEV_JWT_SECRET, DEV_SECRET_KEY, reset_settings
from tests.integration.conftest import (
    Api,
    register_agent,
    unique_capability,
    unique_email,
    wait_for_run,
)
from tests.support.agents import ScriptedAgent

PASSWORD = "correct-horse-battery"


class Account:
    """One user, able to sign in several times (one session each)."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.email = unique_email()
        self.password = PASSWORD
        created = api.post(
            "/auth/register", {"email": self.email, "password": PASSWORD, "name": "S"}
        )
        assert created.status_code == 201, created.text

    def sign_in(self) -> dict[str, Any]:
        response = self.api.post("/auth/login", {"email": self.email, "password": self.password})
        assert response.status_code == 200, response.text
        return dict(response.json()["data"])


@pytest.fixture
def account(api: Api) -> Account:
    return Account(api)


def me(api: Api, access_token: str) -> int:
    return api.get("/auth/me", headers={"Authorization": f"Bearer {access_token}"}).status_code


def refresh(api: Api, refresh_token: str) -> Any:
    return api.post("/auth/refresh", {"refreshToken": refresh_token})


def test_refresh_rotates_the_refresh_token(api: Api, account: Account) -> None:
    first = account.sign_in()
    second = refresh(api, first["refreshToken"])
    assert second.status_code == 200, second.text
    pair = second.json()["data"]
    assert pair["refreshToken"] != first["refreshToken"]
    assert me(api, pair["accessToken"]) == 200
    third = refresh(api, pair["refreshToken"])
    assert third.status_code == 200, "the new token is the one that works now"


def test_a_reused_refresh_token_revokes_its_whole_family(api: Api, account: Account) -> None:
    signed_in = account.sign_in()
    stolen = signed_in["refreshToken"]
    newest = refresh(api, stolen).json()["data"]  # the user refreshes; the thief kept a copy
    reused = refresh(api, stolen)
    assert reused.status_code == 401
    assert "already used" in reused.json()["error"]["message"]
    # The whole family is gone: the newest refresh token and every access token of it.
    assert refresh(api, newest["refreshToken"]).status_code == 401
    assert me(api, newest["accessToken"]) == 401
    assert me(api, signed_in["accessToken"]) == 401
    # Another sign-in of the same user is a different family, untouched.
    other = account.sign_in()
    assert me(api, other["accessToken"]) == 200


def test_logout_ends_that_session_only(api: Api, account: Account) -> None:
    mine, elsewhere = account.sign_in(), account.sign_in()
    response = api.post("/auth/logout", {"refreshToken": mine["refreshToken"]})
    assert response.status_code == 200, response.text
    assert response.json()["data"] == {"sessionsEnded": 1}
    assert refresh(api, mine["refreshToken"]).status_code == 401
    assert me(api, mine["accessToken"]) == 401
    assert me(api, elsewhere["accessToken"]) == 200
    assert refresh(api, elsewhere["refreshToken"]).status_code == 200
    # Signing out again, or with garbage, still answers 200: the caller is signed out.
    again = api.post("/auth/logout", {"refreshToken": mine["refreshToken"]})
    assert again.json()["data"] == {"sessionsEnded": 0}
    assert api.post("/auth/logout", {"refreshToken": "garbage"}).status_code == 200


@pytest.fixture
def issued_on_a_host_ahead(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tokens issued while this fixture is on come from a host whose clock is 2 s ahead
    (each Lambda execution environment reads its own clock); checked by this one's."""
    from chalicelib.auth import tokens

    real = time.time
    monkeypatch.setattr(
        tokens, "time", SimpleNamespace(time=lambda: real() + 2.0, monotonic=time.monotonic)
    )
    yield
    monkeypatch.setattr(tokens, "time", time)


def test_a_token_issued_on_a_host_ahead_is_accepted_at_once_elsewhere(
    api: Api, account: Account, issued_on_a_host_ahead: None
) -> None:
    """Its `iat` in the checking host's future, a fresh token was refused: 401 "Invalid
    token" on /auth/me and /auth/refresh, a client re-signing in, in a loop."""
    tokens = account.sign_in()
    assert me(api, tokens["accessToken"]) == 200
    assert refresh(api, tokens["refreshToken"]).status_code == 200


def test_signing_out_at_once_after_signing_in_on_a_host_ahead_ends_the_session(
    api: Api, account: Account, issued_on_a_host_ahead: None
) -> None:
    """The sign-out answered 200 with sessionsEnded 0, and the session lived on."""
    mine = account.sign_in()
    response = api.post("/auth/logout", {"refreshToken": mine["refreshToken"]})
    assert response.json()["data"] == {"sessionsEnded": 1}
    assert refresh(api, mine["refreshToken"]).status_code == 401


def test_logout_all_ends_every_session_and_its_access_tokens(api: Api, account: Account) -> None:
    sessions = [account.sign_in() for _ in range(3)]
    caller = Api(api.base_url, token=sessions[0]["accessToken"])
    response = caller.post("/auth/logout-all")
    assert response.status_code == 200, response.text
    assert response.json()["data"] == {"sessionsEnded": 3}
    for session in sessions:
        assert me(api, session["accessToken"]) == 401
        assert refresh(api, session["refreshToken"]).status_code == 401
    assert me(api, account.sign_in()["accessToken"]) == 200, "signing in again works"


@pytest.mark.parametrize("sign_out", ["logout", "logout-all"])
def test_a_request_that_read_the_session_just_before_a_sign_out_does_not_revive_it(
    api: Api, account: Account, monkeypatch: pytest.MonkeyPatch, sign_out: str
) -> None:
    """A request that read the session as live just before a sign-out and cached what it
    read just after the sign-out cleared the cache kept the signed-out access token working
    for the cache's 30 s. Now the sign-out leaves a mark the late write cannot replace."""
    tokens = account.sign_in()
    read, go_on = threading.Event(), threading.Event()
    session_state = auth_sessions._session_state

    def read_then_stall(claims: Any) -> dict[str, Any]:
        state = session_state(claims)
        read.set()
        go_on.wait(10)
        return state

    monkeypatch.setattr(auth_sessions, "_session_state", read_then_stall)
    statuses: list[int] = []
    late = threading.Thread(target=lambda: statuses.append(me(api, tokens["accessToken"])))
    late.start()
    assert read.wait(10), "the request never read the session"
    monkeypatch.setattr(auth_sessions, "_session_state", session_state)
    if sign_out == "logout":
        ended = api.post("/auth/logout", {"refreshToken": tokens["refreshToken"]})
    else:
        ended = Api(api.base_url, token=account.sign_in()["accessToken"]).post("/auth/logout-all")
    assert ended.status_code == 200, ended.text
    go_on.set()
    late.join(10)
    assert statuses == [200]  # the session was live when that request read it
    assert me(api, tokens["accessToken"]) == 401


def test_logout_all_needs_an_access_token(api: Api) -> None:
    assert api.post("/auth/logout-all").status_code == 401


def test_a_password_change_ends_every_other_session(api: Api, account: Account) -> None:
    mine, elsewhere = account.sign_in(), account.sign_in()
    caller = Api(api.base_url, token=mine["accessToken"])
    changed = caller.post(
        "/auth/password", {"currentPassword": PASSWORD, "newPassword": "a-brand-new-password"}
    )
    assert changed.status_code == 200, changed.text
    fresh = changed.json()["data"]
    assert me(api, fresh["accessToken"]) == 200, "the caller keeps a fresh session"
    assert refresh(api, fresh["refreshToken"]).status_code == 200
    for old in (mine, elsewhere):
        assert me(api, old["accessToken"]) == 401
        assert refresh(api, old["refreshToken"]).status_code == 401
    old_password = api.post("/auth/login", {"email": account.email, "password": PASSWORD})
    assert old_password.status_code == 401
    account.password = "a-brand-new-password"
    assert me(api, account.sign_in()["accessToken"]) == 200


def test_a_password_change_needs_the_current_password(api: Api, account: Account) -> None:
    signed_in = account.sign_in()
    caller = Api(api.base_url, token=signed_in["accessToken"])
    wrong = caller.post(
        "/auth/password", {"currentPassword": "not-my-password", "newPassword": "whatever-123"}
    )
    assert wrong.status_code == 401
    assert me(api, signed_in["accessToken"]) == 200, "a failed attempt ends nothing"
    short = caller.post("/auth/password", {"currentPassword": PASSWORD, "newPassword": "short"})
    assert short.status_code == 400
    assert short.json()["error"]["details"][0]["field"] == "newPassword"


def test_two_password_changes_with_the_same_current_password_cannot_both_succeed(
    api: Api, account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner and a thief who knows the old password change it at the same moment. Once
    the first change is done the old password is no longer current: the second is a 401.
    Both used to answer 200, the later commit silently undoing the other's new password."""
    owner, thief = account.sign_in(), account.sign_in()
    # Hold each change after its current password was checked until both have been.
    both_checked = threading.Barrier(2, timeout=10)
    hash_password = passwords.hash_password

    def hash_once_both_checked(password: str, rounds: int = 10) -> str:
        both_checked.wait()
        return hash_password(password, rounds)

    monkeypatch.setattr(passwords, "hash_password", hash_once_both_checked)
    answers: dict[str, Any] = {}

    def change(who: str, tokens: dict[str, Any]) -> None:
        answers[who] = Api(api.base_url, token=tokens["accessToken"]).post(
            "/auth/password", {"currentPassword": PASSWORD, "newPassword": f"{who}-new-password"}
        )

    threads = [
        threading.Thread(target=change, args=("owner", owner)),
        threading.Thread(target=change, args=("thief", thief)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    codes = {who: answer.status_code for who, answer in answers.items()}
    assert sorted(codes.values()) == [200, 401], codes
    (winner,) = [who for who, code in codes.items() if code == 200]
    (loser,) = [who for who, code in codes.items() if code == 401]
    assert me(api, answers[winner].json()["data"]["accessToken"]) == 200
    for password, signs_in in ((f"{winner}-new-password", 200), (f"{loser}-new-password", 401)):
        answer = api.post("/auth/login", {"email": account.email, "password": password})
        assert answer.status_code == signs_in, (password, answer.text)


def test_a_session_ends_at_its_absolute_lifetime(api: Api, account: Account) -> None:
    signed_in = account.sign_in()
    sid = jwt.decode(signed_in["refreshToken"], options={"verify_signature": False})["sid"]
    with db.session_scope() as session:  # as if the session had begun 30 days ago
        session.execute(
            text(
                "UPDATE auth_sessions SET expires_at = now() - interval '1 second' WHERE id = :id"
            ),
            {"id": sid},
        )
    from chalicelib import cache

    cache.get_redis().delete(f"maof:auth:session:{sid}")
    assert refresh(api, signed_in["refreshToken"]).status_code == 401
    assert me(api, signed_in["accessToken"]) == 401


# ------------------------------------------------------------------ key rotation


@pytest.fixture
def environment() -> Iterator[None]:
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    reset_settings()


def rotate(**values: str) -> None:
    os.environ.update(values)
    reset_settings()


def test_the_jwt_secret_rotates_without_signing_anyone_out(
    api: Api, account: Account, environment: None
) -> None:
    before = account.sign_in()
    new_secret = "rotated-jwt-secret-" + "n" * 32
    rotate(MAOF_JWT_SECRET=new_secret, MAOF_JWT_PREVIOUS_SECRETS=DEV_JWT_SECRET)
    assert me(api, before["accessToken"]) == 200, "tokens of the previous secret still verify"
    after = refresh(api, before["refreshToken"]).json()["data"]
    assert jwt.get_unverified_header(after["accessToken"])["kid"] == key_id(new_secret)
    assert me(api, after["accessToken"]) == 200
    rotate(MAOF_JWT_PREVIOUS_SECRETS="")  # the previous secret retired
    assert me(api, before["accessToken"]) == 401
    assert me(api, after["accessToken"]) == 200


def test_the_agent_token_key_rotates_without_losing_an_agent(
    user: Api, poller: Any, environment: None
) -> None:
    agent = ScriptedAgent().start()
    try:
        capability = unique_capability("rotate")
        register_agent(user, capability, endpoint=agent.url, authToken="the-agent-token")

        def run_once() -> None:
            response = user.post(
                "/workflows/execute",
                {
                    "workflow": {
                        "name": "r",
                        "stages": [{"id": "a", "name": "A", "agentCapability": capability}],
                    }
                },
            )
            assert (
                wait_for_run(user, response.json()["data"]["workflowRunId"])["status"]
                == "completed"
            )
            assert agent.calls[-1].headers["Authorization"] == "Bearer the-agent-token"

        run_once()
        new_key = "rotated-secret-key-" + "k" * 32
        rotate(MAOF_SECRET_KEY=new_key, MAOF_PREVIOUS_SECRET_KEYS=DEV_SECRET_KEY)
        run_once()  # stored under the previous key, still readable
        assert secrets.reencrypt_all().rewritten >= 1
        assert secrets.reencrypt_all().rewritten == 0, "a second pass finds nothing left to move"
        rotate(MAOF_PREVIOUS_SECRET_KEYS="")  # the previous key retired
        run_once()
    finally:
        agent.stop()
        # Every secret back under the key the later tests use (they run with it).
        rotate(
            MAOF_SECRET_KEY=DEV_SECRET_KEY,
            MAOF_PREVIOUS_SECRET_KEYS="rotated-secret-key-" + "k" * 32,
        )
        secrets.reencrypt_all()
