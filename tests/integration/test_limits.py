"""Abuse limits: sign-in attempts per account and per address (failing closed without
Redis), submissions per user, active runs per user, and how deep a request may nest."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from sqlalchemy import text

from chalicelib import cache, db, limits
from chalicelib.agents import registry
from chalicelib.audit import chain
from chalicelib.config import get_settings, reset_settings
from chalicelib.core import errors
from chalicelib.core.api import parse_run_ref
from tests.integration.conftest import (
    Api,
    register_agent,
    unique_capability,
    unique_email,
    wait_for_run,
    wait_until,
)
from tests.integration.test_delivery import principal_of
from tests.integration.test_redis_down import redis_unreachable
from tests.support.agents import ScriptedAgent, sleep

PASSWORD = "right-password"


@pytest.fixture
def settings_env() -> Iterator[dict[str, str]]:
    """Set MAOF_* settings for one test (the in-process API sees them at once)."""
    changed: dict[str, str] = {}
    saved = dict(os.environ)
    yield changed
    os.environ.clear()
    os.environ.update(saved)
    reset_settings()


def apply(env: dict[str, str], **values: str) -> None:
    env.update(values)
    os.environ.update(values)
    reset_settings()


def rate_limited(response: requests.Response) -> dict[str, Any]:
    """The error of a 429, after checking its Retry-After header matches its details."""
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["code"] == "RATE_LIMITED"
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    assert error["details"] == {"retryAfterSeconds": retry_after}
    assert "Retry-After" in response.headers["Access-Control-Expose-Headers"]
    return dict(error)


def new_account(api: Api) -> str:
    email = unique_email()
    response = api.post("/auth/register", {"email": email, "password": PASSWORD, "name": "R"})
    assert response.status_code == 201, response.text
    return email


def clear(pattern: str) -> None:
    """Forget what the limits counted under `pattern` (other tests sign in too)."""
    keys = cache.get_redis().keys(pattern)
    if keys:
        cache.get_redis().delete(*keys)


def sign_in(api: Api, email: str, password: str = PASSWORD) -> requests.Response:
    return api.post("/auth/login", {"email": email, "password": password})


# ------------------------------------------------------------------ sign-in


def test_too_many_sign_in_attempts_for_one_account_answer_429(api: Api) -> None:
    email = new_account(api)
    for _ in range(get_settings().login_attempts_per_minute):
        assert sign_in(api, email, "wrong-password").status_code == 401
    # Even the right password is refused now, whatever the case of the email.
    rate_limited(sign_in(api, email.upper()))
    # Other accounts are not affected.
    assert sign_in(api, new_account(api)).status_code == 200


def change_password(api: Api, access_token: str, current: str) -> requests.Response:
    return api.post(
        "/auth/password",
        {"currentPassword": current, "newPassword": "a-brand-new-password"},
        headers={"Authorization": f"Bearer {access_token}"},
    )


def test_anyones_failed_sign_ins_do_not_stop_the_owner_changing_their_password(
    api: Api,
) -> None:
    """Password changes used to count against the account's sign-in limit: anyone knowing
    the email could hold its signed-in owner at 429 with wrong passwords at /auth/login."""
    email = new_account(api)
    owner = sign_in(api, email).json()["data"]  # one attempt counted
    for _ in range(get_settings().login_attempts_per_minute - 1):
        assert sign_in(api, email, "wrong-password").status_code == 401
    rate_limited(sign_in(api, email))
    changed = change_password(api, owner["accessToken"], PASSWORD)
    assert changed.status_code == 200, changed.text


def test_too_many_password_changes_by_one_user_answer_429(api: Api) -> None:
    """A stolen access token must not guess the current password freely; its guesses leave
    the account's sign-in limit alone."""
    email = new_account(api)
    signed_in = sign_in(api, email).json()["data"]
    for _ in range(get_settings().login_attempts_per_minute):
        assert change_password(api, signed_in["accessToken"], "wrong-password").status_code == 401
    rate_limited(change_password(api, signed_in["accessToken"], PASSWORD))
    assert sign_in(api, email).status_code == 200


class FakeClock:
    """time.time() as a test sets it, for the limiter's window."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now


@pytest.mark.parametrize("limit", [1, 2, 5])
def test_a_caller_waiting_its_retry_after_is_let_in_and_not_before(
    stack: None, monkeypatch: pytest.MonkeyPatch, limit: int
) -> None:
    """Refused attempts count, so when the oldest attempt leaves the window `limit` are
    still counted (the refused one among them): the wait must run to the attempt whose
    leaving makes room. A client honouring Retry-After used to be refused again."""
    clock, key, window = FakeClock(), f"maof:ratelimit:test:{uuid.uuid4().hex}", 10
    monkeypatch.setattr(cache, "time", clock)
    for at in range(limit):  # `limit` attempts, a second apart: all let in
        clock.now = 1_000_000.0 + at
        assert cache.sliding_window(key, window, limit) == 0
    clock.now += 0.5
    wait = cache.sliding_window(key, window, limit)  # one too many
    # The attempt that must leave is the second oldest counted (the refused one, at limit 1).
    second = 1_000_000.0 + 1 if limit > 1 else clock.now
    assert wait == pytest.approx(second + window - clock.now)
    refused_at = clock.now
    clock.now = refused_at + wait - 0.01
    assert cache.sliding_window(key, window, limit) > 0, "not before"
    clock.now = refused_at + wait + 0.01
    wait = cache.sliding_window(key, window, limit)
    # That early attempt counted too: the wait runs to the next one's leaving.
    assert wait > 0
    clock.now += wait + 0.01
    assert cache.sliding_window(key, window, limit) == 0, "let in after its Retry-After"


def test_too_many_sign_in_attempts_from_one_address_answer_429(
    api: Api, settings_env: dict[str, str]
) -> None:
    accounts = [new_account(api) for _ in range(4)]
    clear("maof:ratelimit:login-ip:*")
    apply(settings_env, MAOF_LOGIN_ATTEMPTS_PER_IP_PER_MINUTE="3")
    for email in accounts[:3]:  # a different account each time: only the address is shared
        assert sign_in(api, email).status_code == 200
    rate_limited(sign_in(api, accounts[3]))


def test_sign_in_fails_closed_when_redis_is_down(api: Api) -> None:
    email = new_account(api)
    with redis_unreachable():
        response = sign_in(api, email)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert sign_in(api, email).status_code == 200  # and works again once Redis is back


# ------------------------------------------------------------------ registration


def register(api: Api) -> Any:
    return api.post("/auth/register", {"email": unique_email(), "password": PASSWORD, "name": "R"})


def test_too_many_new_accounts_from_one_address_answer_429(
    api: Api, settings_env: dict[str, str]
) -> None:
    """Each account brings its own per-user limits (and costs a password hash): made by the
    thousand from one address, they were a way around those limits."""
    clear("maof:ratelimit:register-ip:*")
    apply(settings_env, MAOF_REGISTRATIONS_PER_IP_PER_HOUR="3")
    for _ in range(3):
        assert register(api).status_code == 201
    refused = register(api)
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["code"] == "RATE_LIMITED" and "address" in error["message"]
    retry_after = int(refused.headers["Retry-After"])
    assert 3000 <= retry_after <= 3600  # the oldest of the three leaves the hour's window
    assert error["details"] == {"retryAfterSeconds": retry_after}
    # Hammering keeps the address out, and costs Redis no more than the limit + 1 entries.
    assert [register(api).status_code for _ in range(20)] == [429] * 20
    (key,) = cache.get_redis().keys("maof:ratelimit:register-ip:*")
    assert cache.get_redis().zcard(key) == 4


def test_registration_fails_closed_when_redis_is_down(api: Api) -> None:
    with redis_unreachable():
        response = register(api)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert register(api).status_code == 201  # and works again once Redis is back


def test_an_ipv6_client_is_counted_by_its_64(settings_env: dict[str, str]) -> None:
    """API Gateway reports IPv6 clients too, and one subscriber holds a whole /64: counted
    address by address, each new address of it would bring a fresh limit."""
    clear("maof:ratelimit:*-ip:*")
    apply(
        settings_env,
        MAOF_REGISTRATIONS_PER_IP_PER_HOUR="2",
        MAOF_LOGIN_ATTEMPTS_PER_IP_PER_MINUTE="2",
    )
    for limit in (limits.limit_registrations, lambda ip: limits.limit_sign_in(unique_email(), ip)):
        limit("2001:db8:7:1::1")
        limit("2001:db8:7:1:ffff:ffff:ffff:fffe")
        with pytest.raises(errors.RateLimited):
            limit("2001:db8:7:1:1234::5")  # the same /64
        limit("2001:db8:7:2::1")  # the next /64 is another client
        # An IPv4 address counts as one, however it is written.
        limit("203.0.113.9")
        limit("::ffff:203.0.113.9")
        with pytest.raises(errors.RateLimited):
            limit("203.0.113.9")
        limit("203.0.113.10")


# ------------------------------------------------------------------ submissions


def one_stage_run(capability: str) -> dict[str, Any]:
    return {
        "workflow": {
            "name": "limits",
            "stages": [{"id": "a", "name": "A", "agentCapability": capability}],
        }
    }


def test_submissions_beyond_the_per_user_rate_answer_429(
    user: Api, api: Api, settings_env: dict[str, str]
) -> None:
    apply(settings_env, MAOF_SUBMISSIONS_PER_MINUTE="2")
    capability = unique_capability("rate")
    for _ in range(2):
        assert user.post("/workflows/execute", one_stage_run(capability)).status_code == 202
    error = rate_limited(user.post("/workflows/execute", one_stage_run(capability)))
    assert "submissions" in error["message"]
    # Another user is not affected.
    assert (
        api.as_new_user().post("/workflows/execute", one_stage_run(capability)).status_code == 202
    )


def test_submissions_refused_for_their_definition_count_against_the_per_user_rate(
    user: Api, settings_env: dict[str, str]
) -> None:
    """The definition was checked before the submission was counted: a refused one (an
    input's expanded size above all, costly to measure) could be sent without end."""
    apply(settings_env, MAOF_SUBMISSIONS_PER_MINUTE="2", MAOF_STAGE_MAX_INPUT_BYTES="2000")
    capability = unique_capability("rate-refused")
    too_large = one_stage_run(capability)
    too_large["workflow"]["stages"][0]["input"] = ["${workflow.input.text}"] * 50
    too_large["input"] = {"text": "x" * 100}  # 50 copies of 100 bytes: past 2000
    refused = user.post("/workflows/execute", too_large)
    assert refused.status_code == 400, refused.text
    assert "MAOF_STAGE_MAX_INPUT_BYTES" in refused.json()["error"]["message"]
    cycle = one_stage_run(capability)
    cycle["workflow"]["stages"][0]["dependencies"] = ["a"]
    assert user.post("/workflows/execute", cycle).status_code == 400
    rate_limited(user.post("/workflows/execute", one_stage_run(capability)))


def test_submissions_the_request_schema_refuses_count_against_the_per_user_rate(
    user: Api, settings_env: dict[str, str]
) -> None:
    """Only the definitions submit() refuses were counted: one the request model refuses
    (a bad capability, 101 stages, a name too long, an unknown field) was a 400 before
    anything counted it, and parsing and validating a 1 MB one costs seconds of CPU."""
    apply(settings_env, MAOF_SUBMISSIONS_PER_MINUTE="4")
    capability = unique_capability("rate-schema")
    bad_capability = one_stage_run(capability)
    bad_capability["workflow"]["stages"][0]["agentCapability"] = "Not A Capability"
    too_many = one_stage_run(capability)
    too_many["workflow"]["stages"] = [
        {"id": f"s{i}", "name": "S", "agentCapability": capability} for i in range(101)
    ]
    long_name = one_stage_run(capability)
    long_name["workflow"]["name"] = "n" * 10_000
    unknown = dict(one_stage_run(capability), unknown=True)
    for body in (bad_capability, too_many, long_name, unknown):
        refused = user.post("/workflows/execute", body)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == "VALIDATION_ERROR"
    rate_limited(user.post("/workflows/execute", one_stage_run(capability)))


def test_a_submission_past_the_rate_is_refused_before_its_body_is_read(
    user: Api, sent: Any, settings_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The body was parsed and validated (seconds of CPU for a large one) before the rate
    was counted, so a user past it could still make the service do that without end. Now
    past the rate only a resend whose Idempotency-Key is live has its body read (it must
    be compared with the key's): it gets its run."""
    from chalicelib.http import ApiRequest

    apply(settings_env, MAOF_SUBMISSIONS_PER_MINUTE="1")
    read: list[str] = []
    original = ApiRequest.body

    def spy(self: ApiRequest, model: Any) -> Any:
        read.append(model.__name__)
        return original(self, model)

    monkeypatch.setattr(ApiRequest, "body", spy)
    capability = unique_capability("rate-unread")
    keyed = {"Idempotency-Key": f"unread-{uuid.uuid4()}"}
    first = user.post("/workflows/execute", one_stage_run(capability), headers=keyed)
    assert first.status_code == 202, first.text
    assert read == ["ExecuteRequest"]
    rate_limited(user.post("/workflows/execute", one_stage_run(capability)))
    fresh = {"Idempotency-Key": f"unread-{uuid.uuid4()}"}
    rate_limited(user.post("/workflows/execute", one_stage_run(capability), headers=fresh))
    assert read == ["ExecuteRequest"]
    again = user.post("/workflows/execute", one_stage_run(capability), headers=keyed)
    assert again.status_code == 202, again.text
    assert again.json()["data"]["workflowRunId"] == first.json()["data"]["workflowRunId"]
    assert read == ["ExecuteRequest"] * 2


def test_a_resent_submission_whose_key_is_live_gets_its_run_past_the_rate(
    user: Api, sent: Any, settings_env: dict[str, str]
) -> None:
    """A client resending after a timeout (as maof_client does) was counted and refused
    by the submission rate: told 429 while its run was stored and queued. A live key's
    resend stores nothing, so it gets its run back; a new submission is still refused."""
    apply(settings_env, MAOF_SUBMISSIONS_PER_MINUTE="2")
    capability = unique_capability("rate-key")
    keyed = {"Idempotency-Key": f"resend-{uuid.uuid4()}"}
    first = user.post("/workflows/execute", one_stage_run(capability), headers=keyed)
    assert first.status_code == 202, first.text
    assert user.post("/workflows/execute", one_stage_run(capability)).status_code == 202
    for _ in range(3):
        again = user.post("/workflows/execute", one_stage_run(capability), headers=keyed)
        assert again.status_code == 202, again.text
        assert again.json()["data"]["workflowRunId"] == first.json()["data"]["workflowRunId"]
    other = dict(one_stage_run(capability), input={"other": True})
    assert user.post("/workflows/execute", other, headers=keyed).status_code == 409
    rate_limited(user.post("/workflows/execute", one_stage_run(capability)))


def test_duplicates_sent_at_once_with_one_key_get_the_run_and_spend_one_submission(
    user: Api, sent: Any, settings_env: dict[str, str]
) -> None:
    """Duplicates racing the first submission's commit were each counted by the rate
    before any could see its key: those past MAOF_SUBMISSIONS_PER_MINUTE got a 429 (and
    the others used up the user's rate). Each now waits for the one in flight, then gets
    its run, counted once."""
    apply(settings_env, MAOF_SUBMISSIONS_PER_MINUTE="3")
    capability = unique_capability("rate-race")
    keyed = {"Idempotency-Key": f"race-{uuid.uuid4()}"}
    barrier = threading.Barrier(10)

    def submit(_: int) -> requests.Response:
        barrier.wait()
        return user.post("/workflows/execute", one_stage_run(capability), headers=keyed)

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(submit, range(10)))
    assert [a.status_code for a in answers] == [202] * 10, [a.text for a in answers]
    assert len({a.json()["data"]["workflowRunId"] for a in answers}) == 1
    for _ in range(2):  # the rest of the minute's three
        assert user.post("/workflows/execute", one_stage_run(capability)).status_code == 202
    rate_limited(user.post("/workflows/execute", one_stage_run(capability)))


def test_a_duplicate_arriving_once_the_first_took_the_rates_last_place_gets_its_run(
    user: Api, sent: Any, settings_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first submission with a key took the rate's last place and was still storing its
    run: a duplicate, past the rate before its body was read and its key not yet live, got
    a 429. It now waits for the first to commit, then gets its run."""
    from chalicelib.workflows import runs

    apply(settings_env, MAOF_SUBMISSIONS_PER_MINUTE="1")
    capability = unique_capability("rate-last")
    keyed = {"Idempotency-Key": f"last-{uuid.uuid4()}"}
    storing, stored = threading.Event(), threading.Event()
    original = runs.waiting_reason

    def held(*args: Any) -> Any:  # the first, counted and holding its key, before its insert
        storing.set()
        assert stored.wait(30)
        return original(*args)

    monkeypatch.setattr(runs, "waiting_reason", held)
    with ThreadPoolExecutor(2) as pool:

        def post() -> requests.Response:
            return user.post("/workflows/execute", one_stage_run(capability), headers=keyed)

        first = pool.submit(post)
        assert storing.wait(30)
        monkeypatch.setattr(runs, "waiting_reason", original)
        duplicate = pool.submit(post)

        def waiting_for_the_key() -> bool:
            with db.autocommit_connection() as conn:
                return bool(
                    conn.execute(
                        text(
                            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = "
                            "'advisory' AND NOT granted AND database = (SELECT oid "
                            "FROM pg_database WHERE datname = current_database()))"
                        )
                    ).scalar_one()
                )

        wait_until(lambda: duplicate.done() or waiting_for_the_key(), timeout=30)
        stored.set()
        answers = [first.result(), duplicate.result()]
    assert [a.status_code for a in answers] == [202, 202], [a.text for a in answers]
    assert answers[0].json()["data"]["workflowRunId"] == answers[1].json()["data"]["workflowRunId"]


def test_a_capacity_read_that_fails_in_the_submissions_transaction_still_sends_the_run(
    user: Api, sent: Any
) -> None:
    """The capacity read (which agents serve the first stages, from Postgres when the cached
    list is stale) runs in the submission's own transaction. When it failed there, the
    error was passed over ("cannot tell: send it") but the transaction was left aborted, and
    the submission answered 500. It reads under a savepoint now: the run is sent."""
    from sqlalchemy import event

    capability = unique_capability("aborted")
    register_agent(user, capability)  # the cached list is stale: the submission reads Postgres
    failing = threading.Event()

    def fail_the_read(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> tuple[str, Any]:
        if failing.is_set() and "FROM agents" in statement and "capabilities @>" in statement:
            return "SELECT 1/0", ()  # an error from the database: the transaction aborts
        return statement, parameters

    engine = db.get_engine()
    event.listen(engine, "before_cursor_execute", fail_the_read, retval=True)
    failing.set()
    try:
        response = user.post("/workflows/execute", one_stage_run(capability))
    finally:
        failing.clear()
        event.remove(engine, "before_cursor_execute", fail_the_read)
    assert response.status_code == 202, response.text
    assert len(sent.sent) == 1  # sent, as when its agents' capacity cannot be told


def test_a_submission_refused_for_its_idempotency_key_counts_against_the_rate(
    user: Api, settings_env: dict[str, str]
) -> None:
    """A 400 for the Idempotency-Key header was answered before the refused submissions
    were counted: every other 400 counts (docs/api.md), that one did not."""
    apply(settings_env, MAOF_SUBMISSIONS_PER_MINUTE="2")
    capability = unique_capability("bad-key")
    for _ in range(2):
        refused = user.post(
            "/workflows/execute", one_stage_run(capability), headers={"Idempotency-Key": "x" * 256}
        )
        assert refused.status_code == 400, refused.text
    rate_limited(user.post("/workflows/execute", one_stage_run(capability)))


def test_a_live_key_sent_with_another_body_counts_against_the_rate(
    user: Api, sent: Any, settings_env: dict[str, str]
) -> None:
    """Past the rate a live key's resend is still read (it gets its run back); one whose
    body differs is a 409, and was never counted: any number of other bodies could be
    sent under it and read. Each is counted now, as a refused definition is."""
    apply(settings_env, MAOF_SUBMISSIONS_PER_MINUTE="3")
    capability = unique_capability("live-409")
    keyed = {"Idempotency-Key": f"live-409-{uuid.uuid4()}"}
    assert (
        user.post("/workflows/execute", one_stage_run(capability), headers=keyed).status_code == 202
    )
    for i in range(2):
        other = {**one_stage_run(capability), "input": {"i": i}}
        answer = user.post("/workflows/execute", other, headers=keyed)
        assert answer.status_code == 409, answer.text
    rate_limited(user.post("/workflows/execute", one_stage_run(capability)))


@pytest.fixture
def one_connection(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A pool of one connection, no overflow: what needs a second waits for the pool."""
    monkeypatch.setenv("MAOF_DB_POOL_SIZE", "1")
    monkeypatch.setenv("MAOF_DB_MAX_OVERFLOW", "0")
    reset_settings()
    db.get_engine.cache_clear()
    db._session_factory.cache_clear()
    yield
    db.get_engine().dispose()
    monkeypatch.undo()
    reset_settings()
    db.get_engine.cache_clear()
    db._session_factory.cache_clear()


def test_a_keyed_submission_holding_its_key_takes_no_second_connection(
    user: Api, sent: Any, one_connection: None
) -> None:
    """A keyed submission holds its key, on its connection, until it commits. Its
    capability's agents, read from Postgres on a cache miss, were read on a second one:
    submissions each holding a connection and waiting for another could use up a pool (the
    local server's, shared by its threads; here, its one connection) and stall."""
    capability = unique_capability("one-conn")
    register_agent(user, capability)  # the capability's cached agents are stale now
    keyed = {"Idempotency-Key": f"one-conn-{uuid.uuid4()}"}
    response = user.post("/workflows/execute", one_stage_run(capability), headers=keyed)
    assert response.status_code == 202, response.text


def test_a_submission_refused_for_the_rate_without_a_key_never_hashes_its_body(
    user: Api, settings_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The body's canonical hash (about 0.8 s of CPU for a 1 MB body), which only an
    Idempotency-Key needs, was computed before the rate was counted: each 429 still cost
    it. Past the rate a keyed submission is looked up by its key alone: only a resend of
    a live key is hashed (to be answered its run), not a new one refused."""
    apply(settings_env, MAOF_SUBMISSIONS_PER_MINUTE="1")
    hashed: list[Any] = []
    original = chain.sha256_json

    def spy(value: Any) -> str:
        if isinstance(value, dict) and "workflow" in value:  # a submission's body
            hashed.append(value)
        return original(value)

    monkeypatch.setattr(chain, "sha256_json", spy)
    capability = unique_capability("rate-hash")
    assert user.post("/workflows/execute", one_stage_run(capability)).status_code == 202
    rate_limited(user.post("/workflows/execute", one_stage_run(capability)))
    assert hashed == []
    keyed = {"Idempotency-Key": f"refused-{uuid.uuid4()}"}
    rate_limited(user.post("/workflows/execute", one_stage_run(capability), headers=keyed))
    assert hashed == []


def test_a_retry_counts_against_the_per_user_rate(
    user: Api, sent: Any, monkeypatch: pytest.MonkeyPatch, settings_env: dict[str, str]
) -> None:
    """A retry starts the run's work over (agents called again): cancel and retry in a
    loop started runs without end past MAOF_SUBMISSIONS_PER_MINUTE."""
    from chalicelib.workflows import control

    monkeypatch.setattr(control, "send_stage_messages", sent)
    apply(settings_env, MAOF_SUBMISSIONS_PER_MINUTE="3")
    capability = unique_capability("rate-retry")
    response = user.post("/workflows/execute", one_stage_run(capability))
    assert response.status_code == 202, response.text
    run = response.json()["data"]["workflowRunId"]
    assert user.post(f"/workflows/{run}/cancel").status_code == 202
    accepted = 0
    for _ in range(5):
        retried = user.post(f"/workflows/{run}/retry")
        if retried.status_code == 202:
            accepted += 1
            assert user.post(f"/workflows/{run}/cancel").status_code == 202
        else:
            error = rate_limited(retried)
            assert "submissions" in error["message"]
    assert accepted == 2  # the submission and two retries: the rate of 3
    assert user.get(f"/workflows/{run}").json()["data"]["status"] == "cancelled"


def test_the_active_run_quota_answers_429_until_a_run_ends(
    user: Api, poller: Any, settings_env: dict[str, str]
) -> None:
    agent = ScriptedAgent(default=sleep(1.5)).start()
    try:
        capability = unique_capability("quota")
        register_agent(user, capability, endpoint=agent.url)
        apply(settings_env, MAOF_MAX_ACTIVE_RUNS="2")
        accepted = [user.post("/workflows/execute", one_stage_run(capability)) for _ in range(2)]
        assert [r.status_code for r in accepted] == [202, 202]
        error = rate_limited(user.post("/workflows/execute", one_stage_run(capability)))
        assert "MAOF_MAX_ACTIVE_RUNS" in error["message"]
        runs = user.get("/workflows").json()["data"]["runs"]
        assert len(runs) == 2, "the refused submission stored nothing"
        for response in accepted:
            wait_for_run(user, response.json()["data"]["workflowRunId"])
        assert user.post("/workflows/execute", one_stage_run(capability)).status_code == 202
    finally:
        agent.stop()


def test_concurrent_submissions_never_pass_the_active_run_quota(
    user: Api, sent: Any, settings_env: dict[str, str]
) -> None:
    """Each submission counted the user's live runs in its own statement, blind to the
    others' runs not yet stored: submissions at once all passed a quota of three (twenty
    by hand stored five). Made certain here: every submission waits, inside its statement,
    on a row this test holds (the expired Idempotency-Key it takes over), then all go."""
    apply(settings_env, MAOF_MAX_ACTIVE_RUNS="3")
    capability = unique_capability("race")
    owner, count = principal_of(user).user_uuid, 10
    first = user.post("/workflows/execute", one_stage_run(capability)).json()["data"]
    assert user.post(f"/workflows/{first['workflowRunId']}/cancel").status_code == 202
    keys = [f"race-{uuid.uuid4().hex}" for _ in range(count)]
    with db.session_scope() as session:  # expired keys of that run, to be taken over
        session.execute(
            text(
                "INSERT INTO submission_keys (user_id, key, body_hash, run_id, created_at) "
                "SELECT :owner, k, 'x', :run, now() - interval '2 days' FROM unnest(CAST(:keys AS text[])) AS k"
            ),
            {"owner": owner, "run": parse_run_ref(first["workflowRunId"]), "keys": keys},
        )
    holder = db.get_engine().connect()
    try:
        holder.execute(
            text("SELECT 1 FROM submission_keys WHERE key = ANY(:keys) FOR UPDATE"),
            {"keys": keys},
        )

        def post(key: str) -> requests.Response:
            headers = {"Idempotency-Key": key}
            return user.post("/workflows/execute", one_stage_run(capability), headers=headers)

        with ThreadPoolExecutor(count) as pool:
            answers = pool.map(post, keys)

            def waiting() -> bool:
                with db.autocommit_connection() as conn:
                    found = conn.execute(
                        text(
                            "SELECT count(*) FROM pg_stat_activity "
                            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                        )
                    ).scalar_one()
                return int(found) >= count

            wait_until(waiting, timeout=20)
            holder.commit()  # all go
            codes = sorted(a.status_code for a in answers)
    finally:
        holder.close()
    assert codes == [202] * 3 + [429] * (count - 3)
    assert user.get("/workflows?status=queued").json()["data"]["meta"]["total"] == 3


def test_a_retry_counts_against_the_active_run_quota(
    user: Api, sent: Any, settings_env: dict[str, str]
) -> None:
    """A retried run is live again: cancelling runs and retrying them held any number of
    active runs past MAOF_MAX_ACTIVE_RUNS."""
    apply(settings_env, MAOF_MAX_ACTIVE_RUNS="2")
    capability = unique_capability("retry-quota")

    def submit() -> str:
        response = user.post("/workflows/execute", one_stage_run(capability))
        assert response.status_code == 202, response.text
        return str(response.json()["data"]["workflowRunId"])

    cancelled = [submit(), submit()]
    for run in cancelled:
        assert user.post(f"/workflows/{run}/cancel").status_code == 202
    live = [submit(), submit()]  # at the quota again
    error = rate_limited(user.post(f"/workflows/{cancelled[0]}/retry"))
    assert "MAOF_MAX_ACTIVE_RUNS" in error["message"]
    assert user.get(f"/workflows/{cancelled[0]}").json()["data"]["status"] == "cancelled"
    assert user.post(f"/workflows/{live[0]}/cancel").status_code == 202
    assert user.post(f"/workflows/{cancelled[0]}/retry").status_code == 202


# ------------------------------------------------------------------ nesting


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [65, 1000, 5000, 100_000])
def test_a_request_nested_too_deeply_is_400(user: Api, depth: int) -> None:
    body = '{"workflow": {"name": "deep", "stages": []}, "input": ' + nested(depth) + "}"
    response = user.post(
        "/workflows/execute", data=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    assert "nested" in error["message"]


def test_a_public_route_also_refuses_deep_nesting(api: Api) -> None:
    body = '{"email": ' + nested(5000) + ', "password": "x"}'
    response = api.post("/auth/login", data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "VALIDATION_ERROR"


def test_a_request_at_the_depth_limit_is_accepted(user: Api) -> None:
    # body(1) > input(2): the input's own nesting may use the rest of the 64 levels.
    limit = get_settings().max_json_depth
    document = json.loads(nested(limit - 1))
    response = user.post(
        "/workflows/execute",
        {
            "workflow": {
                "name": "deep-enough",
                "stages": [{"id": "a", "name": "A", "agentCapability": unique_capability()}],
            },
            "input": document,
        },
    )
    assert response.status_code == 202, response.text


# ------------------------------------------------------------------ agents


def agent_body(capability: str) -> dict[str, Any]:
    return {
        "agentId": f"quota-{uuid.uuid4().hex[:8]}",
        "name": "Q",
        "endpoint": "mock://quota",
        "authToken": "t",
        "capabilities": [capability],
    }


def test_an_account_holds_at_most_max_agents_per_user_live_agents(
    api: Api, settings_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each agent is probed every health interval from MAOF's addresses: registered by the
    thousand, they made MAOF send requests by the thousand to whatever they named."""
    apply(settings_env, MAOF_MAX_AGENTS_PER_USER="3")
    owner, capability = api.as_new_user(), unique_capability("quota")
    first = [owner.post("/agents/register", agent_body(capability)) for _ in range(2)]
    assert [r.status_code for r in first] == [201, 201]
    # Registrations at once for the last place (in process, released together by a
    # barrier, each in its own transaction): exactly one takes it.
    barrier, principal = threading.Barrier(6), principal_of(owner)
    counted = registry._within_quota

    def slow_after_counting(owner_id: uuid.UUID, session: Any) -> None:
        counted(owner_id, session)
        time.sleep(0.2)  # the others count meanwhile, unless they wait for this one

    monkeypatch.setattr(registry, "_within_quota", slow_after_counting)

    def register_at_once(_: int) -> str:
        body = registry.RegisterAgentRequest.model_validate(agent_body(capability))
        barrier.wait()
        try:
            registry.register(principal, body)
        except errors.Conflict:
            return "refused"
        return "registered"

    with ThreadPoolExecutor(6) as pool:
        outcomes = sorted(pool.map(register_at_once, range(6)))
    assert outcomes == ["refused"] * 5 + ["registered"]
    refused = owner.post("/agents/register", agent_body(capability))
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert "MAOF_MAX_AGENTS_PER_USER" in error["message"]
    assert error["details"] == [{"field": "body", "message": "at most 3 agents per account"}]
    # Another account has places of its own; a deleted agent frees one.
    assert api.as_new_user().post("/agents/register", agent_body(capability)).status_code == 201
    assert owner.delete(f"/agents/{first[0].json()['data']['agentUuid']}").status_code == 200
    assert owner.post("/agents/register", agent_body(capability)).status_code == 201


def test_counting_an_owners_agents_holds_up_none_of_their_other_writes(
    user: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The count locks the owner's row against other registrations only: a submission,
    whose insert checks its foreign key to the owner, goes on meanwhile."""
    counted, holding, done = registry._within_quota, threading.Event(), threading.Event()

    def count_and_hold(owner_id: uuid.UUID, session: Any) -> None:
        counted(owner_id, session)
        holding.set()
        done.wait(10)

    monkeypatch.setattr(registry, "_within_quota", count_and_hold)
    capability = unique_capability("held")
    body = registry.RegisterAgentRequest.model_validate(agent_body(capability))
    registering = threading.Thread(target=registry.register, args=(principal_of(user), body))
    registering.start()
    try:
        assert holding.wait(10)
        started = time.monotonic()
        submitted = user.post("/workflows/execute", one_stage_run(capability))
        waited = time.monotonic() - started
    finally:
        done.set()
        registering.join(10)
    assert submitted.status_code == 202, submitted.text
    assert waited < 5, waited
