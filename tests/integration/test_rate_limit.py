"""Password guessing is slowed down: too many sign-in attempts for one account answer 429."""

from __future__ import annotations

from chalicelib.config import get_settings
from tests.integration.conftest import unique_email


def test_too_many_sign_in_attempts_for_one_account_answer_429(api):
    email = unique_email()
    assert (
        api.post(
            "/auth/register", {"email": email, "password": "right-password", "name": "R"}
        ).status_code
        == 201
    )
    limit = get_settings().login_attempts_per_minute
    for _ in range(limit):
        assert (
            api.post("/auth/login", {"email": email, "password": "wrong-password"}).status_code
            == 401
        )
    refused = api.post("/auth/login", {"email": email.upper(), "password": "right-password"})
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "RATE_LIMITED"
    assert error["details"] == {"retryAfterSeconds": 60}
    # Other accounts are not affected.
    other = unique_email()
    api.post("/auth/register", {"email": other, "password": "right-password", "name": "O"})
    assert (
        api.post("/auth/login", {"email": other, "password": "right-password"}).status_code == 200
    )
