"""Abuse limits: sign-in attempts per account and per source address, password changes
per user, new accounts per source address, submissions and on-demand agent health probes
per user, and a cap on each user's active runs.

Sign-in, password-change and registration limits fail closed (503 when Redis is down:
password guessing must never become unlimited, nor account creation, each a password hash
and a fresh set of per-user limits); the submission rate fails open (Redis is a cache, and
the active-run quota, counted in Postgres by the submission itself, still bounds a user);
so does the health probe rate (a probe is one GET per API request, ended by its timeout,
and failing closed would stop agent registration whenever Redis is away).
"""

from __future__ import annotations

import hashlib
import ipaddress

import redis

from chalicelib import cache
from chalicelib.config import get_settings
from chalicelib.core import errors
from chalicelib.logs import logger

WINDOW_SECONDS = 60
REGISTRATION_WINDOW_SECONDS = 3600


def _digest(value: str) -> str:
    # No addresses or emails in Redis keys.
    return hashlib.sha256(value.encode("utf-8")).hexdigest()[:32]


def _address(source_ip: str) -> str:
    """What a per-address limit counts: an IPv4 address (also written IPv4-mapped), or an
    IPv6 address's /64, since one subscriber is given a whole /64 and could otherwise
    walk through 2**64 addresses, each with a fresh limit."""
    try:
        address = ipaddress.ip_address(source_ip)
    except ValueError:
        return source_ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def limit_sign_in(email: str, source_ip: str | None) -> None:
    """At most MAOF_LOGIN_ATTEMPTS_PER_MINUTE per account and
    MAOF_LOGIN_ATTEMPTS_PER_IP_PER_MINUTE per source address, over a sliding minute."""
    settings = get_settings()
    checks = [(f"maof:ratelimit:login:{_digest(email)}", settings.login_attempts_per_minute)]
    if source_ip:
        checks.append(
            (
                f"maof:ratelimit:login-ip:{_digest(_address(source_ip))}",
                settings.login_attempts_per_ip_per_minute,
            )
        )
    _fail_closed(checks, WINDOW_SECONDS, "Sign-in", "Too many sign-in attempts")


def limit_password_changes(user_key: str) -> None:
    """At most MAOF_LOGIN_ATTEMPTS_PER_MINUTE password changes per user, over a sliding
    minute, so a stolen access token cannot guess the current password freely. Counted
    apart from the account's sign-in limit, which anyone who knows the email can use up."""
    _fail_closed(
        [(f"maof:ratelimit:password-change:{user_key}", get_settings().login_attempts_per_minute)],
        WINDOW_SECONDS,
        "Password change",
        "Too many password change attempts",
    )


def limit_registrations(source_ip: str | None) -> None:
    """At most MAOF_REGISTRATIONS_PER_IP_PER_HOUR new accounts per source address, over a
    sliding hour: accounts made by the thousand would each bring their own per-user limits."""
    if source_ip:
        key = f"maof:ratelimit:register-ip:{_digest(_address(source_ip))}"
        limit = get_settings().registrations_per_ip_per_hour
        _fail_closed(
            [(key, limit)],
            REGISTRATION_WINDOW_SECONDS,
            "Registration",
            "Too many new accounts from this address",
        )


def _fail_closed(checks: list[tuple[str, int]], window: int, what: str, refused: str) -> None:
    """Count one attempt under each (key, limit); 429 past any limit, 503 without Redis."""
    try:
        wait = max(cache.sliding_window(key, window, limit) for key, limit in checks)
    except redis.RedisError as exc:
        logger.warning(f"{what.lower()} limiter unavailable", extra={"error": type(exc).__name__})
        raise errors.ServiceUnavailable(
            f"{what} is temporarily unavailable; try again shortly"
        ) from None
    if wait:
        raise errors.RateLimited(f"{refused}; try again later", wait)


def _fail_open(key: str, limit: int, what: str, refused: str) -> None:
    """Count one event under `key`; 429 past `limit`, nothing counted without Redis."""
    try:
        wait = cache.sliding_window(key, WINDOW_SECONDS, limit)
    except redis.RedisError as exc:
        logger.warning(f"{what} limiter unavailable", extra={"error": type(exc).__name__})
        return
    if wait:
        raise errors.RateLimited(refused, wait)


SUBMISSIONS_REFUSED = "Too many workflow submissions; slow down"


def limit_submissions(user_key: str) -> None:
    """At most MAOF_SUBMISSIONS_PER_MINUTE workflow submissions per user, sliding minute."""
    _fail_open(
        _submissions_key(user_key),
        get_settings().submissions_per_minute,
        "submission",
        SUBMISSIONS_REFUSED,
    )


def submissions_wait(user_key: str) -> float:
    """Seconds before one more submission would be within MAOF_SUBMISSIONS_PER_MINUTE (0:
    it would be now), counting none; 0 without Redis (the rate fails open)."""
    try:
        return cache.window_wait(
            _submissions_key(user_key), WINDOW_SECONDS, get_settings().submissions_per_minute
        )
    except redis.RedisError as exc:
        logger.warning("submission limiter unavailable", extra={"error": type(exc).__name__})
        return 0.0


def count_refused_submission(user_key: str) -> errors.RateLimited:
    """Count a submission refused before submit() could count it (it was past the rate, or
    its body was refused), as every refused one is (reading one costs CPU, and hammering
    keeps a caller out); the 429 to answer one refused for the rate."""
    try:
        limit_submissions(user_key)
    except errors.RateLimited as refused:
        return refused
    return errors.RateLimited(SUBMISSIONS_REFUSED, 1)  # room came meanwhile: counted in it


def _submissions_key(user_key: str) -> str:
    return f"maof:ratelimit:submit:{user_key}"


def limit_health_checks(user_key: str) -> None:
    """At most MAOF_HEALTH_CHECKS_PER_MINUTE agent health probes a user asks for (a
    health-check, a registration), sliding minute: the agent quota alone would let one
    agent and a loop make MAOF a source of requests by the thousand at whatever it names."""
    _fail_open(
        f"maof:ratelimit:health-check:{user_key}",
        get_settings().health_checks_per_minute,
        "health check",
        "Too many agent health checks; slow down",
    )
