"""Redis: a cache and counters only; every caller copes with it being down."""

from __future__ import annotations

import functools
import json
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


def count_in_window(key: str, window_seconds: int) -> int | None:
    """Count one more event under `key` in a fixed window; None when Redis is unreachable
    (callers then do not limit: Redis is a cache, never a gate)."""
    try:
        pipe = get_redis().pipeline()
        pipe.incr(key)
        pipe.expire(key, window_seconds, nx=True)
        return int(pipe.execute()[0])
    except redis.RedisError:
        return None
