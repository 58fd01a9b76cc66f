"""Agent health: probe `GET <endpoint>/health`, record online/degraded/offline.

| the probe gets                           | status   |
|------------------------------------------|----------|
| 2xx with `{"status": "healthy"}`         | online   |
| 404 or 405 (the agent has no /health)    | online   |
| any other 2xx or 4xx                     | degraded |
| 5xx, timeout, connection refused         | offline  |

`mock://` agents are online where mock agents are enabled. The probe goes through the SSRF
guard (`network.pinned_request`): an endpoint it refuses is offline. Results go to Postgres
(status, lastHealthCheck) and Redis; a status change drops the capability cache so routing
follows at once.
"""

from __future__ import annotations

import concurrent.futures
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import urllib3
from sqlalchemy import select, update

from chalicelib import cache, responses
from chalicelib.agents.dispatch import is_mock
from chalicelib.agents.network import EndpointNotAllowed, pinned_request
from chalicelib.agents.registry import invalidate_capability
from chalicelib.config import get_settings
from chalicelib.db import session_scope
from chalicelib.db.models import Agent
from chalicelib.logs import logger

# No keep-alive: a probe must open a fresh connection to tell whether the agent is up.
PROBE_HEADERS = {"Connection": "close"}


def health_url(endpoint: str) -> str:
    return endpoint.rstrip("/") + "/health"


def probe(endpoint: str) -> str:
    """The status one health probe of `endpoint` gives."""
    if is_mock(endpoint):
        return "online"
    seconds = get_settings().agent_health_timeout_ms / 1000
    try:
        response = pinned_request(
            "GET",
            health_url(endpoint),
            headers=PROBE_HEADERS,
            timeout=urllib3.Timeout(connect=seconds, read=seconds),
        )
        body = response.read(4096)
        response.release_conn()
    except (EndpointNotAllowed, urllib3.exceptions.HTTPError):
        return "offline"
    if response.status in (404, 405):
        return "online"
    if response.status >= 500:
        return "offline"
    if 200 <= response.status < 300:
        try:
            healthy = json.loads(body).get("status") == "healthy"
        except (ValueError, AttributeError):
            healthy = False
        return "online" if healthy else "degraded"
    return "degraded"


def _record(results: dict[uuid.UUID, str]) -> list[responses.Agent]:
    now = datetime.now(UTC)
    changed_capabilities: set[str] = set()
    with session_scope() as session:
        agents = session.scalars(select(Agent).where(Agent.id.in_(list(results)))).all()
        for agent in agents:
            status = results[agent.id]
            if status != agent.status:
                changed_capabilities.update(agent.capabilities)
                logger.info(
                    "agent status changed",
                    extra={"agentId": agent.agent_id, "from": agent.status, "to": status},
                )
            session.execute(
                update(Agent)
                .where(Agent.id == agent.id)
                .values(status=status, last_health_check=now, updated_at=now)
            )
            agent.status, agent.last_health_check = status, now
    for agent in agents:
        cache.set_json(
            f"maof:agents:health:{agent.id}",
            {"status": agent.status, "checkedAt": now.isoformat()},
            get_settings().agent_health_interval_seconds * 3,
        )
    for capability in changed_capabilities:
        invalidate_capability(capability)
    from chalicelib.agents.registry import agent_view

    return [agent_view(a) for a in agents]


def check_agents(agent_uuids: list[uuid.UUID] | None = None) -> list[responses.Agent]:
    """Probe the given live agents (all of them by default) concurrently; record the results."""
    with session_scope() as session:
        query = select(Agent.id, Agent.endpoint).where(Agent.deleted_at.is_(None))
        if agent_uuids is not None:
            query = query.where(Agent.id.in_(agent_uuids))
        targets = session.execute(query).all()
    if not targets:
        return []
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(targets))) as pool:
        statuses = pool.map(lambda target: probe(target.endpoint), targets)
        results = {target.id: status for target, status in zip(targets, statuses, strict=True)}
    return _record(results)


def scheduled_check() -> dict[str, Any]:
    checked = check_agents()
    counts: dict[str, int] = {}
    for agent in checked:
        counts[agent.status] = counts.get(agent.status, 0) + 1
    return {"checked": len(checked), "statuses": counts}
