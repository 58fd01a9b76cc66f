"""Pick the agent for a stage: capable, live, not offline, least loaded; count in-flight tasks."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import redis

from chalicelib import cache
from chalicelib.agents.registry import candidates
from chalicelib.logs import logger

INFLIGHT_TTL_SECONDS = 900


class NoAgentAvailable(Exception):
    """No registered agent can take a stage; the message names the capability."""


@dataclass(frozen=True)
class AgentChoice:
    agent_uuid: str
    agent_id: str
    max_concurrent_tasks: int


def _inflight_key(agent_uuid: str) -> str:
    return f"maof:agents:inflight:{agent_uuid}"


def _inflight(agent_uuids: list[str]) -> list[int] | None:
    try:
        values = cast(list[Any], cache.get_redis().mget([_inflight_key(u) for u in agent_uuids]))
    except redis.RedisError:
        return None
    return [int(v or 0) for v in values]


def select_agent(capability: str) -> AgentChoice:
    """The capable agent with the most free capacity (online before degraded); ties at random.

    Without Redis there are no load figures, and the load is spread at random.
    """
    found = candidates(capability)
    if not found:
        raise NoAgentAvailable(f"No available agent has the capability '{capability}'")
    loads = _inflight([a["agentUuid"] for a in found])

    def rank(index: int) -> tuple[int, float, float]:
        agent = found[index]
        load = loads[index] if loads else 0
        free = agent["maxConcurrentTasks"] - load
        return (
            0 if agent["status"] == "online" else 1,
            -min(free, 1),
            load / agent["maxConcurrentTasks"],
        )

    indexes = list(range(len(found)))
    random.shuffle(indexes)
    best = found[min(indexes, key=rank)]
    return AgentChoice(best["agentUuid"], best["agentId"], best["maxConcurrentTasks"])


@contextmanager
def in_flight(agent: AgentChoice) -> Iterator[None]:
    """Count a task against the agent while it runs (best effort when Redis is down)."""
    key = _inflight_key(agent.agent_uuid)
    counted = False
    try:
        pipe = cache.get_redis().pipeline()
        pipe.incr(key)
        pipe.expire(key, INFLIGHT_TTL_SECONDS)
        pipe.execute()
        counted = True
    except redis.RedisError as exc:
        logger.warning("in-flight count unavailable", extra={"error": type(exc).__name__})
    try:
        yield
    finally:
        if counted:
            try:
                cache.get_redis().decr(key)
            except redis.RedisError:
                pass
