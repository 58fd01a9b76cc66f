"""Redis: a cache and counters only; every caller copes with it being down."""

from __future__ import annotations

import functools
import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from chalicelib.config import get_settings
from chalicelib.logs import logger

T = TypeVar("T")
# After a call could not connect or timed out, every call fails at once for this long; then
# one thread tries for as long (the others still fail at once), and if none of its calls
# failed, every call goes to Redis again.
AWAY_SECONDS = 1.0


class RedisBreaker(Retry):
    """A circuit breaker, which redis-py lacks, in the hook it runs every connect, command
    and pipeline through (as its default: no retries). A Redis that hangs (a partition, a
    stalled node) made each call wait out its 0.5 s timeout, several a stage: a cache outage
    slowed work tenfold; now it costs one timeout a second a process. Callers see
    redis.ConnectionError, as when Redis is down. The state is the class's: redis-py copies
    this object into each connection."""

    _lock = threading.Lock()
    state = "closed"  # closed, open (every call fails at once), probing (one thread tries)
    until = 0.0  # monotonic: when open or probing ends
    _prober: int | None = None

    def __init__(self) -> None:
        super().__init__(NoBackoff(), 0)

    def call_with_retry(
        self, do: Callable[[], T], fail: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> T:
        if not self.may_try():
            raise redis.ConnectionError(f"Redis did not answer lately: not tried ({self.state})")
        try:
            return super().call_with_retry(do, fail, *args, **kwargs)
        except self._supported_errors:
            self.trip()
            raise

    @classmethod
    def may_try(cls) -> bool:
        if cls.state == "closed":
            return True
        with cls._lock:
            now, me = time.monotonic(), threading.get_ident()
            if cls.state == "open":
                if now < cls.until:
                    return False
                cls.state, cls.until, cls._prober = "probing", now + AWAY_SECONDS, me
                return True
            if now >= cls.until:  # the probe's time is over and none of its calls failed
                cls.state, cls._prober = "closed", None
            return cls.state == "closed" or cls._prober == me

    @classmethod
    def trip(cls) -> None:
        with cls._lock:
            cls.state, cls.until, cls._prober = "open", time.monotonic() + AWAY_SECONDS, None

    @classmethod
    def close(cls) -> None:
        with cls._lock:
            cls.state, cls.until, cls._prober = "closed", 0.0, None


@functools.lru_cache(maxsize=1)
def get_redis() -> redis.Redis:
    return redis.Redis.from_url(
        get_settings().redis_url,
        socket_connect_timeout=0.5,
        socket_timeout=0.5,
        health_check_interval=30,
        decode_responses=True,
        retry=RedisBreaker(),
    )


def reset() -> None:
    if get_redis.cache_info().currsize:
        get_redis().close()
    get_redis.cache_clear()
    RedisBreaker.close()


def get_json(key: str) -> Any | None:
    """The cached value, or None when absent or when Redis is unreachable."""
    try:
        raw = get_redis().get(key)
    except redis.RedisError as exc:
        logger.warning(
            "redis unavailable for read", extra={"key": key, "error": type(exc).__name__}
        )
        return None
    return None if raw is None else json.loads(str(raw))


def set_json(key: str, value: Any, ttl_seconds: int, *, if_absent: bool = False) -> None:
    """Best effort; `if_absent`: only where the key holds nothing (SET NX), so a value read
    earlier never replaces a newer one (see set_json_many)."""
    try:
        get_redis().set(key, json.dumps(value, default=str), ex=max(ttl_seconds, 1), nx=if_absent)
    except redis.RedisError as exc:
        logger.warning(
            "redis unavailable for write", extra={"key": key, "error": type(exc).__name__}
        )


def set_json_many(keys: list[str], value: Any, ttl_seconds: int) -> None:
    """One value for every key, in one round trip (best effort)."""
    if not keys:
        return
    try:
        pipe = get_redis().pipeline(transaction=False)
        for key in keys:
            pipe.set(key, json.dumps(value, default=str), ex=max(ttl_seconds, 1))
        pipe.execute()
    except redis.RedisError as exc:
        logger.warning("redis unavailable for write", extra={"error": type(exc).__name__})


def ping() -> bool:
    try:
        return bool(get_redis().ping())
    except redis.RedisError:
        return False


def sliding_window(key: str, window_seconds: int, limit: int) -> float:
    """Count one more event under `key` over the last `window_seconds`; 0 when that keeps
    within `limit`, else the seconds until one more event would: until all but the newest
    limit - 1 counted events have left the window (the oldest leaving is not enough, as
    this refused event counts too). Refused events count (hammering keeps a caller out),
    but only the newest limit + 1 are kept: a caller hammering for the whole window (an
    hour, for registrations) costs Redis no more than one just past the limit. Raises
    redis.RedisError: each caller decides whether a limit without Redis fails open or
    closed."""
    now = time.time()
    pipe = get_redis().pipeline()  # MULTI: the steps are one atomic unit
    pipe.zremrangebyscore(key, 0, now - window_seconds)
    pipe.zadd(key, {f"{now:.6f}:{uuid.uuid4().hex[:8]}": now})
    pipe.zremrangebyrank(key, 0, -(limit + 2))
    pipe.zcard(key)
    pipe.zrange(key, -limit, -limit, withscores=True)  # the last of those to leave
    pipe.expire(key, window_seconds)
    _, _, _, count, leaving, _ = pipe.execute()
    return 0.0 if int(count) <= limit else _until_leaving(leaving, window_seconds, now)


def window_wait(key: str, window_seconds: int, limit: int) -> float:
    """Seconds until one more event under `key` would be within `limit` as sliding_window
    counts them (0: it would be now; else once all but the newest limit - 1 counted events
    have left the window), counting none. Raises redis.RedisError."""
    now = time.time()
    pipe = get_redis().pipeline()
    pipe.zcount(key, f"({now - window_seconds}", "+inf")
    pipe.zrange(key, -limit, -limit, withscores=True)  # the last of those to leave
    count, leaving = pipe.execute()
    return 0.0 if int(count) < limit else _until_leaving(leaving, window_seconds, now)


def _until_leaving(leaving: list[tuple[Any, float]], window_seconds: int, now: float) -> float:
    """Seconds until the counted event `leaving` (zrange withscores: none or one) leaves."""
    return max(0.0, float(leaving[0][1]) + window_seconds - now) if leaving else window_seconds


def counter(key: str) -> int | None:
    """An integer counter's value (0 when unset), or None when Redis is unreachable."""
    try:
        return int(str(get_redis().get(key) or 0))
    except redis.RedisError as exc:
        logger.warning(
            "redis unavailable for read", extra={"key": key, "error": type(exc).__name__}
        )
        return None


def bump(*keys: str, ttl_seconds: int) -> None:
    """Move each generation counter on, and keep it `ttl_seconds` more (best effort:
    without Redis there is nothing cached). A counter never comes back to a value it had,
    even once its key has expired: a key made afresh starts from the clock, in
    microseconds, past every value an earlier one reached (each started from the clock
    too, or from 0, and went up by one a change, far fewer than one a microsecond), as
    long as the hosts' clocks agree within `ttl_seconds`."""
    if not keys:
        return
    start = time.time_ns() // 1000
    try:
        pipe = get_redis().pipeline()  # MULTI: a fresh key is started and moved on at once
        for key in keys:
            pipe.set(key, start, nx=True)
            pipe.incr(key)
            pipe.expire(key, ttl_seconds)
        pipe.execute()
    except redis.RedisError as exc:
        logger.warning("redis unavailable for write", extra={"error": type(exc).__name__})
