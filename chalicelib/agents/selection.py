"""Pick the agent for a stage and hold a slot of its capacity while the stage runs.

Candidates are live, not offline agents declaring the capability that may serve the
run's submitter (their own agents, and shared ones). Among those with
free capacity (in-flight tasks counted in Redis, capped at maxConcurrentTasks), MAOF
prefers online agents, then a lower recent failure rate, then lower recent latency,
then the lighter load; ties go at random so load spreads. When every capable agent is
full the stage waits (AgentsBusy). Without Redis there are no counts: capacity is not
enforced and the choice among the best-status agents is random.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass
from typing import Any, cast

import redis

from chalicelib import cache
from chalicelib.agents.registry import (
    cached_candidates,
    candidates_uncached,
    capability_cache_key,
    capability_generation_key,
    serves,
)
from chalicelib.agents.secrets import decrypt_token
from chalicelib.logs import logger

INFLIGHT_TTL_SECONDS = 900
STATS_TTL_SECONDS = 3600


class NoAgentAvailable(Exception):
    """No registered agent can take the stage; the message names the capability."""


class AgentsBusy(Exception):
    """Every capable agent is at its maxConcurrentTasks: the stage should wait."""


@dataclass(frozen=True)
class AgentChoice:
    agent_uuid: str
    agent_id: str
    endpoint: str
    token_encrypted: str
    max_concurrent_tasks: int
    reserved: bool  # a slot is held in Redis and must be released

    @property
    def token(self) -> str:
        return decrypt_token(self.token_encrypted)


def _inflight_key(agent_uuid: str) -> str:
    return f"maof:agents:inflight:{agent_uuid}"


def _stats_key(agent_uuid: str) -> str:
    return f"maof:agents:stats:{agent_uuid}"


MIN_CALLS_FOR_STATS = 5


Figures = tuple[int, float, float]  # in-flight, failure rate, mean latency ms


def _figures_of(values: list[Any]) -> Figures:
    """An agent's figures from its GET in-flight and HGETALL stats replies.

    Rates and latencies count only after MIN_CALLS_FOR_STATS calls in the last hour, so
    a new agent is not ranked below one that got lucky with its first call."""
    inflight = int(values[0] or 0)
    stats = values[1] or {}
    ok, failed = int(stats.get("ok", 0)), int(stats.get("failed", 0))
    calls = ok + failed
    if calls < MIN_CALLS_FOR_STATS:
        return (inflight, 0.0, 0.0)
    return (inflight, failed / calls, float(stats.get("latency_ms", 0)) / calls)


def _figures(agent_uuids: list[str]) -> list[Figures] | None:
    """(in-flight, failure rate, mean latency ms) per agent, or None without Redis."""
    try:
        pipe = cache.get_redis().pipeline(transaction=False)
        for agent_uuid in agent_uuids:
            pipe.get(_inflight_key(agent_uuid))
            pipe.hgetall(_stats_key(agent_uuid))
        values = pipe.execute()
    except redis.RedisError:
        return None
    return [_figures_of(values[2 * i : 2 * i + 2]) for i in range(len(agent_uuids))]


# The agents last seen in each capability's candidate list: their figures are read in the
# same round trip as the (cached) list itself, and used when the list still names them.
_last_seen: dict[str, list[str]] = {}


def _candidates_and_figures(capability: str) -> tuple[list[dict[str, Any]], dict[str, Figures]]:
    """The capability's candidates (cached in Redis for the current generation, else read
    from Postgres), and the figures of the agents among them that were read with the list
    (possibly none)."""
    guess = _last_seen.get(capability, [])
    try:
        pipe = cache.get_redis().pipeline(transaction=False)
        pipe.get(capability_cache_key(capability))
        pipe.get(capability_generation_key(capability))
        for agent_uuid in guess:
            pipe.get(_inflight_key(agent_uuid))
            pipe.hgetall(_stats_key(agent_uuid))
        values = pipe.execute()
    except redis.RedisError as exc:
        # As cache.get_json does when Redis is down: say so, read Postgres.
        logger.warning(
            "redis unavailable for read",
            extra={"key": capability_cache_key(capability), "error": type(exc).__name__},
        )
        return candidates_uncached(capability, generation=None), {}
    generation = int(values[1] or 0)
    entry = json.loads(str(values[0])) if values[0] is not None else None
    found = cached_candidates(entry, generation)
    known: dict[str, Figures] = {}
    if found is None:
        found = candidates_uncached(capability, generation)  # read Postgres, and cache
    else:
        known = {u: _figures_of(values[2 + 2 * i : 4 + 2 * i]) for i, u in enumerate(guess)}
    _last_seen[capability] = [a["agentUuid"] for a in found]
    return found, known


def eligible(
    capability: str, owner: uuid.UUID, exclude: frozenset[str] = frozenset()
) -> list[dict[str, Any]]:
    """The agents that may serve a stage of `owner`'s run: live, not offline, declaring the
    capability, the owner's own or shared, and not in `exclude`."""
    found, _ = _candidates_and_figures(capability)
    return [a for a in found if serves(a, owner) and a["agentUuid"] not in exclude]


def select_agent(
    capability: str,
    owner: uuid.UUID,
    *,
    prefer: str | None = None,
    exclude: frozenset[str] = frozenset(),
) -> AgentChoice:
    """Reserve a slot on the best agent that may serve a stage of `owner`'s run.

    `prefer` (the agent of a stage being retried) is the only one considered while it is
    still a candidate; `exclude` holds agents that already had their turn.
    """
    listed, known = _candidates_and_figures(capability)
    found = [a for a in listed if serves(a, owner) and a["agentUuid"] not in exclude]
    if not found:
        raise NoAgentAvailable(f"No available agent has the capability '{capability}'")
    if prefer is not None and any(a["agentUuid"] == prefer for a in found):
        found = [a for a in found if a["agentUuid"] == prefer]
    uuids = [a["agentUuid"] for a in found]
    figures = [known[u] for u in uuids] if all(u in known for u in uuids) else _figures(uuids)
    if figures is None:
        best_status = min(_status_rank(a) for a in found)
        pick = random.choice([a for a in found if _status_rank(a) == best_status])
        return _choice(pick, reserved=False)
    order = list(range(len(found)))
    random.shuffle(order)
    order.sort(
        key=lambda i: (
            _status_rank(found[i]),
            # Coarse buckets: only a clearly worse failure rate or latency ranks lower.
            round(figures[i][1], 1),
            round(figures[i][2], -2),
            figures[i][0] / found[i]["maxConcurrentTasks"],
        )
    )
    for index in order:
        agent = found[index]
        if figures[index][0] >= agent["maxConcurrentTasks"]:
            continue
        if _reserve(agent["agentUuid"], agent["maxConcurrentTasks"]):
            return _choice(agent, reserved=True)
    raise AgentsBusy(f"every agent with the capability '{capability}' is at capacity")


def _status_rank(agent: dict[str, Any]) -> int:
    return 0 if agent["status"] == "online" else 1


def _choice(agent: dict[str, Any], reserved: bool) -> AgentChoice:
    return AgentChoice(
        agent_uuid=agent["agentUuid"],
        agent_id=agent["agentId"],
        endpoint=agent["endpoint"],
        token_encrypted=agent["tokenEncrypted"],
        max_concurrent_tasks=agent["maxConcurrentTasks"],
        reserved=reserved,
    )


def _reserve(agent_uuid: str, limit: int) -> bool:
    """Take one slot atomically: count up, and back down if that went over the limit."""
    key = _inflight_key(agent_uuid)
    try:
        pipe = cache.get_redis().pipeline()
        pipe.incr(key)
        pipe.expire(key, INFLIGHT_TTL_SECONDS)
        count = int(pipe.execute()[0])
        if count <= limit:
            return True
        cache.get_redis().decr(key)
        return False
    except redis.RedisError as exc:
        logger.warning("in-flight count unavailable", extra={"error": type(exc).__name__})
        return True


def release(agent: AgentChoice) -> None:
    if not agent.reserved:
        return
    try:
        cache.get_redis().decr(_inflight_key(agent.agent_uuid))
    except redis.RedisError:
        pass


def settle(agent: AgentChoice, ok: bool, latency_ms: float) -> None:
    """After a call: give the agent's slot back and count the outcome and latency for
    ranking, in one round trip (best effort)."""
    key = _stats_key(agent.agent_uuid)
    try:
        pipe = cache.get_redis().pipeline()
        if agent.reserved:
            pipe.decr(_inflight_key(agent.agent_uuid))
        pipe.hincrby(key, "ok" if ok else "failed", 1)
        pipe.hincrbyfloat(key, "latency_ms", latency_ms)
        pipe.expire(key, STATS_TTL_SECONDS)
        pipe.execute()
    except redis.RedisError:
        pass


def inflight_count(agent_uuid: str | uuid.UUID) -> int | None:
    try:
        return int(cast(Any, cache.get_redis().get(_inflight_key(str(agent_uuid)))) or 0)
    except redis.RedisError:
        return None
