"""GET /health: database, Redis and queue, each checked in parallel within a deadline."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text

from chalicelib import __version__, cache
from chalicelib.aws import aws_client, stage_queue_url
from chalicelib.db import get_engine
from chalicelib.http import Reply

# The whole check must answer within 2 s even when a dependency hangs.
DEADLINE_SECONDS = 1.5

# Long-lived so a hung check never blocks the next request on shutdown.
_pool = concurrent.futures.ThreadPoolExecutor(max_workers=6, thread_name_prefix="health")


def _database() -> bool:
    with get_engine().connect() as conn:
        conn.execute(text("SET LOCAL statement_timeout = 1000"))
        return conn.execute(text("SELECT 1")).scalar() == 1


def _queue() -> bool:
    aws_client("sqs", fast_fail=True).get_queue_attributes(
        QueueUrl=stage_queue_url(), AttributeNames=["ApproximateNumberOfMessages"]
    )
    return True


CHECKS: dict[str, Callable[[], bool]] = {
    "database": _database,
    "redis": cache.ping,
    "queue": _queue,
}


def check() -> Reply:
    futures = {name: _pool.submit(fn) for name, fn in CHECKS.items()}
    concurrent.futures.wait(futures.values(), timeout=DEADLINE_SECONDS)
    services: dict[str, Any] = {}
    for name, future in futures.items():
        ok = future.done() and future.exception() is None and bool(future.result())
        services[name] = "connected" if ok else "disconnected"
    healthy = all(state == "connected" for state in services.values())
    body = {
        "status": "ok" if healthy else "degraded",
        "timestamp": datetime.now(UTC).isoformat(),
        "version": __version__,
        "services": services,
    }
    return Reply(body, 200 if healthy else 503)
