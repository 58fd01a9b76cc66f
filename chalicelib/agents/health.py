"""Agent health: probe `GET <endpoint>/health`, record online/degraded/offline.

| the probe gets                                | status   |
|-----------------------------------------------|----------|
| 2xx with `{"status": "healthy"}` within 4 KiB | online   |
| 404 or 405 (the agent has no /health)         | online   |
| any other 2xx (a longer body too) or 4xx      | degraded |
| 5xx, timeout, connection refused              | offline  |

`mock://` agents are online where mock agents are enabled. The probe goes through the SSRF
guard (`network.pinned_request`): an endpoint it refuses is offline. A probe whose name
lookup could not even begin by its deadline (every lookup thread held by other names that
hang) says nothing of the agent: nothing is recorded, and the agent keeps its status.
Results go to Postgres (status, lastHealthCheck) and Redis; a status change drops the
capability cache so routing follows at once, and an agent back from offline is handed to
the caller's `available` (the engine wakes the stages waiting for it).
"""

from __future__ import annotations

import concurrent.futures
import json
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import urllib3
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from chalicelib import cache
from chalicelib.agents.candidates import invalidate_capability
from chalicelib.agents.dispatch import is_mock
from chalicelib.agents.network import EndpointNotAllowed, ResolverBusy, pinned_request, read_by
from chalicelib.config import get_settings
from chalicelib.db import session_scope
from chalicelib.db.models import Agent
from chalicelib.logs import logger

# A healthy answer's body is at most this long; a longer one is degraded (docs/protocol.md).
MAX_HEALTH_BODY = 4096
# No keep-alive: a probe must open a fresh connection to tell whether the agent is up.
PROBE_HEADERS = {"Connection": "close"}


def health_url(endpoint: str) -> str:
    """`<endpoint>/health`: /health after the endpoint's path, its query kept (an agent
    may be told apart by it), a fragment (never sent) dropped."""
    parts = urlsplit(endpoint)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/health", fragment=""))


def probe(endpoint: str) -> str | None:
    """The status one health probe of `endpoint` gives; None if it could not be made (no
    thread was free to look the agent's name up by its deadline: MAOF's want, not the
    agent's fault)."""
    if is_mock(endpoint):
        return "online"
    seconds = get_settings().agent_health_timeout_ms / 1000
    deadline = time.monotonic() + seconds  # the whole probe: an agent pacing its bytes
    try:  # holds no health check (nor the others after it) past its timeout
        response = pinned_request(
            "GET",
            health_url(endpoint),
            headers=PROBE_HEADERS,
            timeout=urllib3.Timeout(connect=seconds, read=seconds),
            deadline=deadline,
        )
        try:
            body = read_by(response, deadline, MAX_HEALTH_BODY)
        finally:
            response.release_conn()
    except ResolverBusy:
        return None
    except (EndpointNotAllowed, urllib3.exceptions.HTTPError, OSError):
        return "offline"
    if response.status in (404, 405):
        return "online"
    if response.status >= 500:
        return "offline"
    if 200 <= response.status < 300:
        if len(body) > MAX_HEALTH_BODY:
            return "degraded"  # read_by stops one byte past: not its prefix, parsed
        try:
            healthy = json.loads(body).get("status") == "healthy"
        except (ValueError, AttributeError, RecursionError):  # nested past Python's parser
            healthy = False
        return "online" if healthy else "degraded"
    return "degraded"


# Told of an agent (its uuid, its maxConcurrentTasks) that may take work it could not
# before: registered, shared by an admin, or back from offline. The engine wakes stages
# waiting for it.
Available = Callable[[uuid.UUID, int], object]


def _record(
    session: Session, results: dict[uuid.UUID, str | None], started: datetime
) -> tuple[list[Agent], list[Agent], set[str], list[Agent]]:
    """In the caller's transaction: each agent's status and check time (`started`: when
    its probe began), unless its probe could not be made (None), a probe that began later
    was recorded first (two checks of one agent at once: the newest result stands) or the
    agent was deleted. Returns the live agents, those recorded, the capabilities of those
    whose status changed (their candidate lists are stale), and those back from offline."""
    changed: set[str] = set()
    recorded: list[Agent] = []
    revived: list[Agent] = []
    live = (
        select(Agent)
        .where(Agent.id.in_(list(results)), Agent.deleted_at.is_(None))
        .order_by(Agent.id)  # locked in one order: two checks never deadlock
        .with_for_update()
    )
    agents = list(session.scalars(live).all())
    now = datetime.now(UTC)
    for agent in agents:
        status = results[agent.id]
        if status is None:  # not probed: the status stands, unless none was ever recorded
            if agent.last_health_check is not None:
                continue
            status = "offline"  # (a new agent's is a placeholder): not routed to unchecked
        if agent.last_health_check is not None and agent.last_health_check >= started:
            continue
        recorded.append(agent)
        if status != agent.status:
            changed.update(agent.capabilities)
            if agent.status == "offline":
                revived.append(agent)
            logger.info(
                "agent status changed",
                extra={"agentId": agent.agent_id, "from": agent.status, "to": status},
            )
        session.execute(
            update(Agent)
            .where(Agent.id == agent.id)
            .values(status=status, last_health_check=started, updated_at=now)
        )
        agent.status, agent.last_health_check = status, started
    return agents, recorded, changed, revived


PROBES_AT_ONCE = 16


def _database_now() -> datetime:
    """The database's clock: checks made from different hosts (the schedule, an owner's
    request) are ordered by one clock, not by each host's own, which may be ahead."""
    with session_scope() as session:
        return session.execute(text("SELECT clock_timestamp()")).scalar_one()  # type: ignore[no-any-return]


def _probe_apart(endpoint: str) -> str | None:
    """probe(), whose failure, whatever an agent answered, marks that agent offline and
    no other: the check records every agent probed with it."""
    try:
        return probe(endpoint)
    except Exception as exc:
        logger.exception("health probe failed", extra={"error": type(exc).__name__})
        return "offline"


def check(
    targets: Sequence[tuple[uuid.UUID, str]], available: Available | None = None
) -> list[Agent]:
    """Probe these agents (id, endpoint) concurrently and record the results: one
    transaction, then Redis (each agent's health; the candidates of a capability whose
    agents changed status); then tell `available` of each agent back from offline. An
    agent whose probe could not be made is returned as it was, nothing recorded."""
    if not targets:
        return []
    started = _database_now()
    with concurrent.futures.ThreadPoolExecutor(
        max_workers=min(PROBES_AT_ONCE, len(targets))
    ) as pool:
        statuses = pool.map(lambda target: _probe_apart(target[1]), targets)
        results = {
            agent_uuid: status for (agent_uuid, _), status in zip(targets, statuses, strict=True)
        }
    with session_scope() as session:
        agents, recorded, changed, revived = _record(session, results, started)
    for agent in recorded:
        cache.set_json(
            f"maof:agents:health:{agent.id}",
            {"status": agent.status, "checkedAt": started.isoformat()},
            get_settings().agent_health_interval_seconds * 3,
        )
    for capability in changed:
        invalidate_capability(capability)
    if available is not None:
        for agent in revived:
            available(agent.id, agent.max_concurrent_tasks)
    return agents


# The scheduled check probes agents in chunks, each recorded once probed, the stalest
# first, each of as many waves of probes as fit in what is left of CHECK_BUDGET_SECONDS
# (the function has 60 s): agents left over, however many are slow or unreachable, are the
# first next time, and no result waits on every agent being probed. The budget holds a wave
# of the longest probe timeout allowed (MAOF_AGENT_HEALTH_TIMEOUT_MS, 10 s), so every
# check records something.
CHECK_CHUNK = 64
CHECK_BUDGET_SECONDS = 40.0


def scheduled_check(
    budget_seconds: float = CHECK_BUDGET_SECONDS, available: Available | None = None
) -> dict[str, Any]:
    """Probe the live agents, the longest unchecked first, for up to `budget_seconds`
    (`available`: told of each agent back from offline); how many, by the status each now
    has, and how many are left for the next check."""
    until = time.monotonic() + budget_seconds
    with session_scope() as session:
        targets = session.execute(
            select(Agent.id, Agent.endpoint)
            .where(Agent.deleted_at.is_(None))
            .order_by(Agent.last_health_check.asc().nulls_first(), Agent.id)
        ).all()
    # A chunk's probes run PROBES_AT_ONCE at a time, a wave ending by the probe timeout.
    probe_seconds = get_settings().agent_health_timeout_ms / 1000
    checked: list[Agent] = []
    start = 0
    while start < len(targets):
        waves = int((until - time.monotonic()) // probe_seconds)
        size = min(CHECK_CHUNK, waves * PROBES_AT_ONCE)
        if size <= 0:
            break
        chunk = targets[start : start + size]
        checked += check([(target.id, target.endpoint) for target in chunk], available)
        start += size
    counts: dict[str, int] = {}
    for agent in checked:
        counts[agent.status] = counts.get(agent.status, 0) + 1
    return {"checked": len(checked), "statuses": counts, "left": len(targets) - len(checked)}
