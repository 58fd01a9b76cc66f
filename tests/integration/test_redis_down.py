"""Redis is a cache: with it down, the API and the engine keep working from Postgres."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import pytest

from chalicelib import cache
from chalicelib.config import reset_settings
from tests.integration.conftest import register_agent, unique_capability, wait_for_run


@contextlib.contextmanager
def redis_unreachable() -> Iterator[None]:
    """MAOF pointed at a closed port instead of Redis, for the duration."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    saved = os.environ["MAOF_REDIS_URL"]
    os.environ["MAOF_REDIS_URL"] = f"redis://127.0.0.1:{closed_port}/0"
    reset_settings()
    cache.reset()
    try:
        yield
    finally:
        os.environ["MAOF_REDIS_URL"] = saved
        reset_settings()
        cache.reset()


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
