"""Redis: a cache and counters only; every caller copes with it being down."""

from __future__ import annotations

import functools
import json
import time
import uuid
from typing import Any

import redis

from chalicelib.config import get_settings
from chalicelib.logs import logger


@functools.lru_cache(maxsize=1)
def get_redis() -> redis.Redis:
    return redis.Redis.from_url(
        get_settings().redis_url,
        socket_connect_timeout=0.5,
        socket_timeout=0.5,
        health_check_interval=30,
        decode_responses=True,
    )


def reset() -> None:
    if get_redis.cache_info().currsize:
        get_redis().close()
    get_redis.cache_clear()


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


def set_json(key: str, value: Any, ttl_seconds: int) -> None:
    try:
        get_redis().set(key, json.dumps(value, default=str), ex=max(ttl_seconds, 1))
    except redis.RedisError as exc:
        logger.warning(
            "redis unavailable for write", extra={"key": key, "error": type(exc).__name__}
        )


def delete(*keys: str) -> None:
    if not keys:
        return
    try:
        get_redis().delete(*keys)
    except redis.RedisError as exc:
        logger.warning("redis unavailable for delete", extra={"error": type(exc).__name__})


def ping() -> bool:
    try:
        return bool(get_redis().ping())
    except redis.RedisError:
        return False


def sliding_window(key: str, window_seconds: int, limit: int) -> float:
    """Count one more event under `key` over the last `window_seconds`; 0 when that keeps
    within `limit`, else the seconds until the oldest counted event leaves the window.
    Refused events count too (hammering keeps a caller out). Raises redis.RedisError:
    each caller decides whether a limit without Redis fails open or closed."""
    now = time.time()
    pipe = get_redis().pipeline()  # MULTI: the four steps are one atomic unit
    pipe.zremrangebyscore(key, 0, now - window_seconds)
    pipe.zadd(key, {f"{now:.6f}:{uuid.uuid4().hex[:8]}": now})
    pipe.zcard(key)
    pipe.zrange(key, 0, 0, withscores=True)
    pipe.expire(key, window_seconds)
    _, _, count, oldest, _ = pipe.execute()
    if int(count) <= limit:
        return 0.0
    return max(0.0, float(oldest[0][1]) + window_seconds - now) if oldest else window_seconds


def counter(key: str) -> int | None:
    """An integer counter's value (0 when unset), or None when Redis is unreachable."""
    try:
        return int(str(get_redis().get(key) or 0))
    except redis.RedisError as exc:
        logger.warning(
            "redis unavailable for read", extra={"key": key, "error": type(exc).__name__}
        )
        return None


def bump(*keys: str) -> None:
    """Add one to each counter (best effort: without Redis there is nothing cached)."""
    if not keys:
        return
    try:
        pipe = get_redis().pipeline(transaction=False)
        for key in keys:
            pipe.incr(key)
        pipe.execute()
    except redis.RedisError as exc:
        logger.warning("redis unavailable for write", extra={"error": type(exc).__name__})
