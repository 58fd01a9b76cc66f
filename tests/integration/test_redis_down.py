"""Redis is a cache: with it down, the API and the engine keep working from Postgres."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from chalicelib import cache
from chalicelib.config import reset_settings
from devstack import stack as local_stack
from tests.integration.conftest import (
    free_port,
    register_agent,
    unique_capability,
    wait_for_run,
    wait_until,
)


@contextlib.contextmanager
def redis_at(url: str) -> Iterator[None]:
    """MAOF pointed at `url` instead of the test Redis, for the duration."""
    saved = os.environ["MAOF_REDIS_URL"]
    os.environ["MAOF_REDIS_URL"] = url
    reset_settings()
    cache.reset()
    try:
        yield
    finally:
        os.environ["MAOF_REDIS_URL"] = saved
        reset_settings()
        cache.reset()


@contextlib.contextmanager
def redis_unreachable() -> Iterator[None]:
    """MAOF pointed at a closed port instead of Redis, for the duration."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    with redis_at(f"redis://127.0.0.1:{closed_port}/0"):
        yield


@pytest.fixture
def redis_down() -> Iterator[None]:
    with redis_unreachable():
        yield


def test_workflows_run_and_agents_register_while_redis_is_down(user, poller, redis_down):
    assert cache.ping() is False
    capability = unique_capability("noredis")
    register_agent(user, capability)
    response = user.post(
        "/workflows/execute",
        {
            "workflow": {
                "name": "no-redis",
                "stages": [
                    {"id": "a", "name": "A", "agentCapability": capability},
                    {"id": "b", "name": "B", "agentCapability": capability, "dependencies": ["a"]},
                ],
            }
        },
    )
    assert response.status_code == 202
    run = wait_for_run(user, response.json()["data"]["workflowRunId"])
    assert run["status"] == "completed"
    health = user.get("/health")
    assert health.status_code == 503
    assert health.json()["data"]["services"]["redis"] == "disconnected"


# ---------------------------------------------------------------- a Redis that hangs


class FrozenRedis:
    """A Redis of this test's own that can be frozen (SIGSTOP: its connections stay open,
    nothing answers, as behind a partition) and thawed."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        local_stack.start_redis_server("127.0.0.1", self.port, folder)
        self.pidfile = folder / "redis.pid"
        self.pid = int(self.pidfile.read_text().strip())

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)


@pytest.fixture
def frozen_redis(tmp_path: Path) -> Iterator[FrozenRedis]:
    server = FrozenRedis(tmp_path / "redis")
    try:
        with redis_at(f"redis://127.0.0.1:{server.port}/0"):
            assert cache.ping()
            yield server
    finally:
        server.thaw()
        local_stack.stop_pidfile(server.pidfile, "redis")


def outcome(command: str = "get") -> str:
    """What one Redis call (GET k, or INCR n) came to: ok, or the error's name."""
    try:
        cache.get_redis().get("k") if command == "get" else cache.get_redis().incr("n")
    except redis.RedisError as exc:
        return type(exc).__name__
    return "ok"


def at_once(command: str = "get", threads: int = 8) -> list[str]:
    """The outcomes of `threads` calls made together, sorted."""
    start, results = threading.Barrier(threads), []

    def call() -> None:
        start.wait(5)
        results.append(outcome(command))

    running = [threading.Thread(target=call) for _ in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join(10)
    return sorted(results)


def test_a_hanging_redis_costs_one_timeout_not_one_per_call(frozen_redis, monkeypatch):
    """Each call used to wait out its 0.5 s timeout, several a stage: work slowed tenfold
    while Redis hung. After one timeout, calls fail at once (as when Redis is down, which
    every caller copes with), from every thread, pipelines too."""
    monkeypatch.setattr(cache, "AWAY_SECONDS", 60.0)  # no retry within the test
    frozen_redis.freeze()
    assert outcome() == "TimeoutError"
    assert [outcome() for _ in range(20)] == ["ConnectionError"] * 20
    with cache.get_redis().pipeline() as pipe, pytest.raises(redis.ConnectionError):
        pipe.incr("n").execute()
    assert at_once("incr") == ["ConnectionError"] * 8
    assert cache.get_json("k") is None and cache.counter("n") is None  # the callers cope


def test_while_redis_is_away_one_thread_tries_it_again_and_the_others_fail_at_once(
    frozen_redis, monkeypatch
):
    monkeypatch.setattr(cache, "AWAY_SECONDS", 0.2)
    frozen_redis.freeze()
    assert outcome() == "TimeoutError"
    wait_until(lambda: time.monotonic() >= cache.RedisBreaker.until, 5)  # the pause is over
    # One tried (and waited out the timeout); the seven others failed at once meanwhile.
    assert at_once() == ["ConnectionError"] * 7 + ["TimeoutError"]


def test_redis_is_used_again_once_it_answers(frozen_redis, monkeypatch):
    monkeypatch.setattr(cache, "AWAY_SECONDS", 0.2)
    frozen_redis.freeze()
    assert outcome() == "TimeoutError"
    frozen_redis.thaw()
    # The thread that tries again finds it and, its try over, every thread uses it again.
    wait_until(lambda: outcome() == "ok" and cache.RedisBreaker.state == "closed", 5)
    assert at_once("incr") == ["ok"] * 8
    assert cache.counter("n") == 8
