"""GET /health: database, Redis and queue, each checked in parallel within a deadline."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text

from chalicelib import __version__, cache
from chalicelib.aws import aws_client
from chalicelib.config import get_settings
from chalicelib.core import errors, responses
from chalicelib.core.api import Reply
from chalicelib.db import get_engine

# The whole check must answer within 2 s even when a dependency hangs.
DEADLINE_SECONDS = 1.5

# Long-lived so a hung check never blocks the next request on shutdown.
_pool = concurrent.futures.ThreadPoolExecutor(max_workers=6, thread_name_prefix="health")


def _database() -> bool:
    """Reachable and writable: a node that takes no writes (a failover's reader) fails
    every write route, so it is no healthier than one that is away."""
    with get_engine().connect() as conn:
        conn.execute(text("SET LOCAL statement_timeout = 1000"))
        return (
            conn.execute(text("SELECT current_setting('transaction_read_only')")).scalar() == "off"
        )


def _queue() -> bool:
    # Only the fast-failing client: looking the URL up with the ordinary one (long timeouts,
    # retries) could hold a worker for a minute when SQS hangs.
    settings = get_settings()
    sqs = aws_client("sqs", fast_fail=True)
    if settings.stage_queue_url:
        sqs.get_queue_attributes(
            QueueUrl=settings.stage_queue_url, AttributeNames=["ApproximateNumberOfMessages"]
        )
    else:
        sqs.get_queue_url(QueueName=settings.stage_queue_name)
    return True


CHECKS: dict[str, Callable[[], bool]] = {
    "database": _database,
    "redis": cache.ping,
    "queue": _queue,
}


# At most one check per service runs at a time; a request joins the one in flight. A hung
# dependency then holds one worker, instead of one per request until none are left for the rest.
_in_flight: dict[str, concurrent.futures.Future[bool]] = {}
_in_flight_lock = threading.Lock()


def _start(name: str) -> concurrent.futures.Future[bool]:
    with _in_flight_lock:
        future = _in_flight.get(name)
        if future is None or future.done():
            future = _pool.submit(CHECKS[name])
            _in_flight[name] = future
        return future


def check() -> Reply:
    futures = {name: _start(name) for name in CHECKS}
    concurrent.futures.wait(futures.values(), timeout=DEADLINE_SECONDS)
    services: dict[str, Any] = {}
    for name, future in futures.items():
        ok = future.done() and future.exception() is None and bool(future.result())
        services[name] = "connected" if ok else "disconnected"
    healthy = all(state == "connected" for state in services.values())
    body = responses.Health(
        status="ok" if healthy else "degraded",
        timestamp=datetime.now(UTC),
        version=__version__,
        services=responses.Services(**services),
    )
    if healthy:
        return Reply(body)
    down = ", ".join(name for name, state in services.items() if state != "connected")
    return Reply(body, 503, errors.ServiceUnavailable(f"Degraded: {down} disconnected"))
