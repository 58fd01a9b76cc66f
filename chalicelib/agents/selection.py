"""Pick the agent for a stage and hold a slot of its capacity while the stage runs.

Candidates are live, not offline agents declaring the capability that may serve the
run's submitter (their own agents, and shared ones). Among those with
free capacity (in-flight tasks counted in Redis, capped at maxConcurrentTasks), MAOF
prefers online agents, then a lower recent failure rate, then lower recent latency,
then the lighter load; ties go at random so load spreads. When every capable agent is
full the stage waits (AgentsBusy). Without Redis there are no counts: capacity is not
enforced and the choice among the best-status agents is random (an outage of the cache
must not stop the work; agents that refuse excess work answer 429 or 503, which is
retried).

A slot is a lease, not a counter: a member of the agent's Redis sorted set scored by when
it runs out. Counting ignores expired members and reserving prunes them; giving a slot
back removes its member, which is idempotent. A lease runs MAOF_STAGE_LEASE_SECONDS and
the worker holding it renews it (with its stage's, renew_slots), never past the call's
own deadline plus SLOT_MARGIN_SECONDS: the slot of a worker killed mid-call comes back
on its own within one stage lease, however long its call could have run.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

import redis
from cryptography.fernet import InvalidToken
from sqlalchemy.orm import Session

from chalicelib import cache
from chalicelib.agents.candidates import (
    cached_candidates,
    candidates_uncached,
    capability_cache_key,
    capability_generation_key,
    serves,
)
from chalicelib.agents.dispatch import AgentCallFailed
from chalicelib.agents.failure import Failure
from chalicelib.agents.ranking import Figures, best_status, figures_of, preference_order
from chalicelib.agents.secrets import decrypt_token
from chalicelib.config import get_settings
from chalicelib.logs import logger

STATS_TTL_SECONDS = 3600
# A slot outlives its call's deadline by this much (the worker records the outcome).
SLOT_MARGIN_SECONDS = 5.0

# The slots this process holds, (agent uuid, slot) -> the latest their lease may run to.
_held_slots: dict[tuple[str, str], float] = {}
_held_lock = threading.Lock()


def _lease_end(cap: float) -> float:
    return min(cap, time.time() + get_settings().stage_lease_seconds)


def _key_ttl() -> int:
    """Every write to a slots key keeps it this long: past any lease in it (each runs out
    within a stage lease of its last write), and an idle agent's key goes."""
    return get_settings().stage_lease_seconds + 60


def _hold(agent_uuid: str, slot: str, cap: float) -> None:
    with _held_lock:
        _held_slots[(agent_uuid, slot)] = cap


def _let_go(agent_uuid: str, slot: str | None) -> None:
    with _held_lock:
        _held_slots.pop((agent_uuid, str(slot)), None)


def renew_slots() -> None:
    """Extend the lease of every slot this process holds by one stage lease (never past its
    cap); one round trip. A slot Redis lost (restarted without its data, flushed) is put
    back, so the calls still running count against their agents again; until then, new
    reservations may have taken those places (the one window past maxConcurrentTasks after
    a loss: a renewal interval). The lock is held through the round trip: a slot given back
    meanwhile waits for it, and is then removed, never renewed after its release."""
    now = time.time()
    with _held_lock:
        for key, cap in list(_held_slots.items()):
            if cap <= now:
                del _held_slots[key]  # its lease ran to its cap: gone from Redis too
        if not _held_slots:
            return
        try:
            pipe = cache.get_redis().pipeline(transaction=False)
            for (agent_uuid, slot), cap in _held_slots.items():
                pipe.zadd(_slots_key(agent_uuid), {slot: _lease_end(cap)})
                pipe.expire(_slots_key(agent_uuid), _key_ttl())
            pipe.execute()
        except redis.RedisError as exc:
            logger.warning("could not renew agent slots", extra={"error": type(exc).__name__})


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
    slot: str | None = None  # the slot lease held in Redis (None: capacity not enforced)

    @property
    def token(self) -> str:
        """The agent's auth token; AgentCallFailed, an agent that cannot serve (the stage
        falls back), when no configured key reads it (its key dropped before it was
        re-encrypted): it never will until the agent is registered again."""
        try:
            return decrypt_token(self.token_encrypted)
        except InvalidToken:
            raise AgentCallFailed(
                "UNREADABLE_TOKEN: this agent's authToken can no longer be decrypted with any "
                "key; register it again",
                failure=Failure.AGENT_UNUSABLE,
                code="UNREADABLE_TOKEN",
            ) from None


def _slots_key(agent_uuid: str) -> str:
    return f"maof:agents:slots:{agent_uuid}"


def _stats_key(agent_uuid: str) -> str:
    return f"maof:agents:stats:{agent_uuid}"


def _waited_key(agent_uuid: str) -> str:
    return f"maof:agents:waited:{agent_uuid}"


# How long an agent counts as waited for after a stage last found it (and every other
# agent that may serve it) full. Stages wait only behind full agents: while no stage has
# found this one full for so long, its releases need not look in Postgres for any.
WAITED_FOR_SECONDS = 3600


def mark_waited_for(agent_uuids: list[str]) -> None:
    """Every agent that may serve a stage is full, and it may wait for them: their
    releases look for it. Marked before the stage waits (and before its own last look),
    so a release either sees the mark or frees the slot that last look finds."""
    try:
        pipe = cache.get_redis().pipeline(transaction=False)
        for agent_uuid in agent_uuids:
            pipe.set(_waited_key(agent_uuid), 1, ex=WAITED_FOR_SECONDS)
        pipe.execute()
    except redis.RedisError:
        pass  # a release that cannot read the mark looks anyway


def may_be_waited_for(agent: AgentChoice) -> bool:
    """Whether a stage may be waiting for this agent's slots (one found them all taken
    within WAITED_FOR_SECONDS); True when Redis cannot say. False spares a release its
    look in Postgres: the common case, agents with room to spare. A stage left waiting
    past the mark (an agent given more slots, a lease that expired) the sweeper wakes."""
    try:
        return bool(cache.get_redis().exists(_waited_key(agent.agent_uuid)))
    except redis.RedisError:
        return True


def _figures(agent_uuids: list[str]) -> list[Figures] | None:
    """(in-flight, failure rate, mean latency ms) per agent, or None without Redis."""
    try:
        pipe = cache.get_redis().pipeline(transaction=False)
        now = time.time()
        for agent_uuid in agent_uuids:
            pipe.zcount(_slots_key(agent_uuid), now, "+inf")
            pipe.hgetall(_stats_key(agent_uuid))
        values = pipe.execute()
    except redis.RedisError:
        return None
    return [figures_of(values[2 * i : 2 * i + 2]) for i in range(len(agent_uuids))]


# The agents last seen in each candidate list (a capability's, for a user): their figures
# are read in the same round trip as the (cached) list itself, and used when the list
# still names them. Forgotten past LAST_SEEN_KEPT lists: the names are users' to choose.
_last_seen: dict[tuple[str, uuid.UUID], list[str]] = {}
LAST_SEEN_KEPT = 4096


def _candidates_and_figures(
    capability: str,
    owner: uuid.UUID,
    session: Session | None = None,
    usable: Callable[[dict[str, Any]], bool] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Figures]]:
    """The capability's candidates for `owner` (cached in Redis for the current
    generation, else read from Postgres, in `session` if given), and the figures of the
    agents among them that were read with the list (possibly none). A cached list with no
    agent `usable` is read again from Postgres before anyone acts on it."""
    guess = _last_seen.get((capability, owner), [])
    try:
        pipe = cache.get_redis().pipeline(transaction=False)
        pipe.get(capability_cache_key(capability, owner))
        pipe.get(capability_generation_key(capability))
        now = time.time()
        for agent_uuid in guess:
            pipe.zcount(_slots_key(agent_uuid), now, "+inf")
            pipe.hgetall(_stats_key(agent_uuid))
        values = pipe.execute()
    except redis.RedisError as exc:
        # As cache.get_json does when Redis is down: say so, read Postgres.
        logger.warning(
            "redis unavailable for read",
            extra={"key": capability_cache_key(capability, owner), "error": type(exc).__name__},
        )
        return candidates_uncached(capability, owner, None, session), {}
    generation = int(values[1] or 0)
    entry = json.loads(str(values[0])) if values[0] is not None else None
    found = cached_candidates(entry, generation)
    if found is not None and usable is not None and not any(usable(a) for a in found):
        # A stage fails on an empty list: confirm it first. A generation change can be lost
        # (the breaker open when it was made, an evicted key, a replica that lagged), and a
        # lost one must not fail runs for the cache's TTL while a usable agent is registered.
        found = None
    known: dict[str, Figures] = {}
    if found is None:
        found = candidates_uncached(capability, owner, generation, session)  # Postgres, cached
    else:
        known = {u: figures_of(values[2 + 2 * i : 4 + 2 * i]) for i, u in enumerate(guess)}
    if len(_last_seen) >= LAST_SEEN_KEPT:
        _last_seen.clear()
    _last_seen[(capability, owner)] = [a["agentUuid"] for a in found]
    return found, known


def _usable_by(owner: uuid.UUID, exclude: frozenset[str]) -> Callable[[dict[str, Any]], bool]:
    """Whether a listed agent may take a stage of `owner`'s run, not having had its turn."""
    return lambda agent: serves(agent, owner) and agent["agentUuid"] not in exclude


def eligible(
    capability: str, owner: uuid.UUID, exclude: frozenset[str] = frozenset()
) -> list[dict[str, Any]]:
    """The agents that may serve a stage of `owner`'s run: live, not offline, declaring the
    capability, the owner's own or shared, and not in `exclude`."""
    usable = _usable_by(owner, exclude)
    found, _ = _candidates_and_figures(capability, owner, usable=usable)
    return [a for a in found if usable(a)]


def select_agent(
    capability: str,
    owner: uuid.UUID,
    *,
    slot_until: float,
    prefer: str | None = None,
    exclude: frozenset[str] = frozenset(),
) -> AgentChoice:
    """Reserve a slot, until `slot_until` (time.time()) plus the margin, on the best agent
    that may serve a stage of `owner`'s run.

    `prefer` (the agent of a stage being retried) is the only one considered while it is
    still a candidate; `exclude` holds agents that already had their turn.
    """
    usable = _usable_by(owner, exclude)
    listed, known = _candidates_and_figures(capability, owner, usable=usable)
    found = [a for a in listed if usable(a)]
    if not found:
        raise NoAgentAvailable(f"No available agent has the capability '{capability}'")
    if prefer is not None and any(a["agentUuid"] == prefer for a in found):
        found = [a for a in found if a["agentUuid"] == prefer]
    uuids = [a["agentUuid"] for a in found]
    figures = [known[u] for u in uuids] if all(u in known for u in uuids) else _figures(uuids)
    if figures is None:
        return _choice(random.choice(best_status(found)), slot=None)
    for index in preference_order(found, figures):
        agent = found[index]
        if figures[index][0] >= agent["maxConcurrentTasks"]:
            continue
        slot = _reserve(agent["agentUuid"], agent["maxConcurrentTasks"], slot_until)
        if slot is not False:
            return _choice(agent, slot=slot)
    mark_waited_for([a["agentUuid"] for a in listed if serves(a, owner)])
    raise AgentsBusy(busy_reason(capability))


def busy_reason(capability: str) -> str:
    return f"every agent with the capability '{capability}' is at capacity"


def waiting_reason(capability: str, owner: uuid.UUID, session: Session | None = None) -> str | None:
    """Why a stage of `owner`'s run needing `capability` would wait if it came round now
    (every agent that may serve it at capacity), or None: then it is sent, and a worker
    looks for a slot as usual (and fails it, if it may not wait: MAOF_STAGE_MAX_WAITS 0).
    Postgres, if read, is read in `session` when given."""
    if get_settings().stage_max_waits < 1:
        return None
    try:
        return None if may_have_room(capability, owner, session) else busy_reason(capability)
    except Exception as exc:  # cannot tell: send it
        logger.warning("could not read agent capacity", extra={"error": type(exc).__name__})
        return None


def may_have_room(capability: str, owner: uuid.UUID, session: Session | None = None) -> bool:
    """Whether a stage of `owner`'s run needing the capability could find a slot now: an
    agent with it that may serve the run has one free, or none is left (the stage then
    fails), or Redis cannot say (capacity is not enforced then). False only when every
    agent that may serve it is at capacity: other users' private agents never count."""
    listed, known = _candidates_and_figures(capability, owner, session)
    listed = [a for a in listed if serves(a, owner)]
    uuids = [a["agentUuid"] for a in listed]
    figures = [known[u] for u in uuids] if all(u in known for u in uuids) else _figures(uuids)
    if not listed or figures is None:
        return True
    if any(f[0] < a["maxConcurrentTasks"] for a, f in zip(listed, figures, strict=True)):
        return True
    mark_waited_for(uuids)
    return False


def may_have_room_each(pairs: list[tuple[str, uuid.UUID]]) -> list[bool]:
    """may_have_room for each (capability, owner), in three Redis round trips at most in
    all (the cached candidate lists, every agent's slots in use, the marks of those full),
    not two or three per pair: the sweeper asks for every pair with a stage waiting
    (thousands, for one user)."""
    try:
        pipe = cache.get_redis().pipeline(transaction=False)
        for capability, owner in pairs:
            pipe.get(capability_cache_key(capability, owner))
            pipe.get(capability_generation_key(capability))
        values = pipe.execute()
    except redis.RedisError:
        return [True] * len(pairs)  # capacity is not enforced without Redis
    listed: list[list[dict[str, Any]]] = []
    for i, (capability, owner) in enumerate(pairs):
        generation = int(values[2 * i + 1] or 0)
        entry = json.loads(str(values[2 * i])) if values[2 * i] is not None else None
        found = cached_candidates(entry, generation)
        if found is None:
            found = candidates_uncached(capability, owner, generation)  # read Postgres, and cache
        listed.append([a for a in found if serves(a, owner)])
    uuids = sorted({a["agentUuid"] for agents in listed for a in agents})
    try:
        pipe = cache.get_redis().pipeline(transaction=False)
        now = time.time()
        for agent_uuid in uuids:
            pipe.zcount(_slots_key(agent_uuid), now, "+inf")
        in_use = dict(zip(uuids, (int(n) for n in pipe.execute()), strict=True))
    except redis.RedisError:
        return [True] * len(pairs)
    room = [
        not agents or any(in_use[a["agentUuid"]] < a["maxConcurrentTasks"] for a in agents)
        for agents in listed
    ]
    waited_for = {
        a["agentUuid"]
        for agents, free in zip(listed, room, strict=True)
        if not free
        for a in agents
    }
    if waited_for:
        mark_waited_for(sorted(waited_for))
    return room


def _choice(agent: dict[str, Any], slot: str | None) -> AgentChoice:
    return AgentChoice(
        agent_uuid=agent["agentUuid"],
        agent_id=agent["agentId"],
        endpoint=agent["endpoint"],
        token_encrypted=agent["tokenEncrypted"],
        max_concurrent_tasks=agent["maxConcurrentTasks"],
        slot=slot,
    )


# Drop the lease being handed over (if any), prune expired ones, then take one if fewer
# than the limit are live: one atomic step.
_RESERVE = """
if ARGV[5] ~= '' then redis.call('ZREM', KEYS[1], ARGV[5]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
  redis.call('EXPIRE', KEYS[1], ARGV[6])
  return 1
end
return 0
"""


def _reserve(
    agent_uuid: str, limit: int, until: float, instead_of: str = ""
) -> str | Literal[False] | None:
    """A slot lease on the agent until `until` + margin (in place of the lease
    `instead_of`, given back in the same step): its id; False when the agent is full; None
    when Redis is unreachable (capacity not enforced)."""
    slot, cap = uuid.uuid4().hex, until + SLOT_MARGIN_SECONDS
    if instead_of:
        _let_go(agent_uuid, instead_of)
    try:
        script = cache.get_redis().register_script(_RESERVE)
        taken = script(
            keys=[_slots_key(agent_uuid)],
            args=[time.time(), limit, _lease_end(cap), slot, instead_of, _key_ttl()],
        )
    except redis.RedisError as exc:
        logger.warning("agent slots unavailable", extra={"error": type(exc).__name__})
        return None
    if not int(cast(Any, taken)):
        return False
    _hold(agent_uuid, slot, cap)
    return slot


def hand_over(agent: AgentChoice, until: float) -> AgentChoice | None:
    """The same agent's slot under a new lease (for the stage it is handed to): the old
    lease goes and the new one comes in one step, so the slot is never free between. None
    if the old lease had run out and its slot was taken meanwhile: the stage must find one
    like any other (handing over regardless would exceed the agent's capacity)."""
    if agent.slot is None:
        return agent
    slot = _reserve(agent.agent_uuid, agent.max_concurrent_tasks, until, instead_of=agent.slot)
    if slot is False:
        return None
    return replace(agent, slot=slot)


def extend(agent: AgentChoice, until: float) -> AgentChoice | None:
    """Let the slot's lease run to `until` (time.time()) plus the margin, if that is later
    than it may now: the deadline of the call it was taken for, known only once the stage
    it was handed to is under way. None if the lease ran out meanwhile and another stage
    took the slot: this stage must find one like any other. Redis is written only while
    the lease it holds there may stop at the old cap (within a stage lease of now); past
    that, the next renewal carries the new cap (no round trip)."""
    if agent.slot is None:
        return agent
    key, cap = (agent.agent_uuid, agent.slot), until + SLOT_MARGIN_SECONDS
    # Held through the round trip, as renew_slots does: a renewal under the old cap
    # cannot land after this write.
    with _held_lock:
        old = _held_slots.get(key)
        if old is not None and old >= cap:
            return agent
        if old is not None and old >= time.time() + get_settings().stage_lease_seconds:
            _held_slots[key] = cap
            return agent
        try:
            pipe = cache.get_redis().pipeline(transaction=False)
            pipe.zadd(_slots_key(agent.agent_uuid), {agent.slot: _lease_end(cap)}, xx=True)
            pipe.zscore(_slots_key(agent.agent_uuid), agent.slot)
            if pipe.execute()[1] is None:  # pruned by a reservation once its lease ran out
                _held_slots.pop(key, None)
                return None
        except redis.RedisError:
            pass  # cannot tell: the renewals carry the new cap once Redis answers
        _held_slots[key] = cap
    return agent


def release(agent: AgentChoice) -> None:
    """Give the slot back (idempotent; best effort: it expires by its deadline anyway)."""
    if agent.slot is None:
        return
    _let_go(agent.agent_uuid, agent.slot)
    try:
        cache.get_redis().zrem(_slots_key(agent.agent_uuid), agent.slot)
    except redis.RedisError:
        pass


def settle(agent: AgentChoice, ok: bool, latency_ms: float, *, keep_slot: bool = False) -> bool:
    """After a call: count the outcome and latency for ranking and, unless the slot was
    handed on (`keep_slot`), give it back, in one round trip (best effort). True when the
    slot given back was the agent's last free one to be taken: stages may be waiting."""
    key = _stats_key(agent.agent_uuid)
    releasing = agent.slot is not None and not keep_slot
    if releasing:
        _let_go(agent.agent_uuid, agent.slot)
    try:
        pipe = cache.get_redis().pipeline()
        if releasing:
            pipe.zrem(_slots_key(agent.agent_uuid), str(agent.slot))
            pipe.zcount(_slots_key(agent.agent_uuid), time.time(), "+inf")
        pipe.hincrby(key, "ok" if ok else "failed", 1)
        pipe.hincrbyfloat(key, "latency_ms", latency_ms)
        pipe.expire(key, STATS_TTL_SECONDS)
        values = pipe.execute()
    except redis.RedisError:
        return False
    return releasing and int(values[1]) + 1 >= agent.max_concurrent_tasks


def reserve_on(agent: AgentChoice, until: float) -> AgentChoice | None:
    """A slot on this agent (already chosen) until `until` + margin, or None if it is full
    (or Redis is away: then nothing is waiting for its slots)."""
    slot = _reserve(agent.agent_uuid, agent.max_concurrent_tasks, until)
    return replace(agent, slot=slot) if isinstance(slot, str) else None


def live_slots(agent_uuid: str | uuid.UUID) -> int | None:
    """How many of the agent's slots are held now; None without Redis."""
    try:
        return int(
            cast(Any, cache.get_redis().zcount(_slots_key(str(agent_uuid)), time.time(), "+inf"))
        )
    except redis.RedisError:
        return None
