"""Register, list, read and (soft) delete agents; cache lookups by capability in Redis."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import Field, field_validator
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from chalicelib import cache, errors
from chalicelib.agents.mock import MOCK_AGENTS_DISABLED, mock_agents_enabled
from chalicelib.agents.network import EndpointNotAllowed, check_endpoint_allowed
from chalicelib.agents.secrets import encrypt_token
from chalicelib.capabilities import Capability
from chalicelib.config import get_settings
from chalicelib.db import insert_unique, session_scope
from chalicelib.db.models import Agent
from chalicelib.http import ApiModel, PageQuery, Principal, page_meta


class RegisterAgentRequest(ApiModel):
    agent_id: str = Field(min_length=1, max_length=255)
    name: str = Field(min_length=1, max_length=255)
    endpoint: str = Field(min_length=1, max_length=2048)
    auth_token: str = Field(min_length=1, max_length=1024, repr=False)
    capabilities: list[Capability] = Field(min_length=1, max_length=50)
    description: str | None = Field(default=None, max_length=2000)
    max_concurrent_tasks: int = Field(default=5, ge=1, le=100)

    @field_validator("endpoint")
    @classmethod
    def _absolute_http_url(cls, value: str) -> str:
        parsed = urlparse(value)
        if parsed.scheme == "mock":
            if not parsed.hostname:
                raise ValueError("must be an absolute http:// or https:// URL (or mock://name)")
            if not mock_agents_enabled():
                raise ValueError(MOCK_AGENTS_DISABLED)
            return value
        try:
            check_endpoint_allowed(value)
        except EndpointNotAllowed as exc:
            raise ValueError(f"the agent endpoint is not allowed: {exc}") from None
        return value

    @field_validator("capabilities")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


class AgentQuery(PageQuery):
    capability: Capability | None = None
    status: Literal["online", "degraded", "offline"] | None = None


def agent_view(agent: Agent) -> dict[str, Any]:
    """The public shape of an agent; the auth token is never part of it."""
    return {
        "agentUuid": str(agent.id),
        "agentId": agent.agent_id,
        "name": agent.name,
        "description": agent.description,
        "endpoint": agent.endpoint,
        "capabilities": agent.capabilities,
        "maxConcurrentTasks": agent.max_concurrent_tasks,
        "status": agent.status,
        "lastHealthCheck": agent.last_health_check,
        "ownerUserUuid": str(agent.owner_id),
        "createdAt": agent.created_at,
        "updatedAt": agent.updated_at,
    }


def capability_cache_key(capability: str) -> str:
    return f"maof:agents:capability:{capability}"


def _invalidate(capabilities: list[str]) -> None:
    cache.delete(*[capability_cache_key(c) for c in capabilities])


def register(principal: Principal, body: RegisterAgentRequest) -> dict[str, Any]:
    agent = Agent(
        agent_id=body.agent_id,
        owner_id=principal.user_uuid,
        name=body.name,
        description=body.description,
        endpoint=body.endpoint,
        auth_token_encrypted=encrypt_token(body.auth_token),
        capabilities=body.capabilities,
        max_concurrent_tasks=body.max_concurrent_tasks,
        status="online",
    )
    insert_unique(
        agent,
        errors.Conflict(
            f"An agent with agentId '{body.agent_id}' is already registered",
            [{"field": "agentId", "message": "already registered"}],
        ),
    )
    _invalidate(agent.capabilities)
    # A new agent is checked at once, so its status is real from the start.
    return check_health(str(agent.id))


def check_health(agent_uuid: str) -> dict[str, Any]:
    """Probe one live agent now and return it with its new status."""
    from chalicelib.agents.health import check_agents

    checked = check_agents([parse_uuid(agent_uuid, "Agent")])
    if not checked:
        raise errors.NotFound("Agent not found")
    return checked[0]


def list_agents(query: AgentQuery) -> dict[str, Any]:
    conditions: list[ColumnElement[bool]] = [Agent.deleted_at.is_(None)]
    if query.capability:
        conditions.append(Agent.capabilities.contains([query.capability]))
    if query.status:
        conditions.append(Agent.status == query.status)
    with session_scope() as session:
        total = session.scalar(select(func.count()).select_from(Agent).where(*conditions)) or 0
        agents = session.scalars(
            select(Agent)
            .where(*conditions)
            .order_by(Agent.created_at.desc(), Agent.id)
            .offset(query.offset)
            .limit(query.limit)
        ).all()
    return {"agents": [agent_view(a) for a in agents], "meta": page_meta(total, query)}


def parse_uuid(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise errors.NotFound(f"{what} not found") from None


def _live_agent(session: Session, agent_uuid: str) -> Agent:
    agent = session.get(Agent, parse_uuid(agent_uuid, "Agent"))
    if agent is None or agent.deleted_at is not None:
        raise errors.NotFound("Agent not found")
    return agent


def get_agent(agent_uuid: str) -> dict[str, Any]:
    with session_scope() as session:
        return agent_view(_live_agent(session, agent_uuid))


def delete_agent(principal: Principal, agent_uuid: str) -> dict[str, Any]:
    with session_scope() as session:
        agent = _live_agent(session, agent_uuid)
        if agent.owner_id != principal.user_uuid:
            raise errors.Forbidden("Only the agent's owner can delete it")
        session.execute(
            update(Agent)
            .where(Agent.id == agent.id)
            .values(deleted_at=datetime.now(UTC), updated_at=func.now())
        )
        capabilities = list(agent.capabilities)
    _invalidate(capabilities)
    return {"agentUuid": agent_uuid, "deleted": True}


def candidates(capability: str) -> list[dict[str, Any]]:
    """Live, not-offline agents declaring exactly `capability` (cached briefly in Redis)."""
    cached = cache.get_json(capability_cache_key(capability))
    if cached is not None:
        return list(cached)
    return candidates_uncached(capability)


def candidates_uncached(capability: str) -> list[dict[str, Any]]:
    """`candidates` read from Postgres, and cached for the next callers."""
    with session_scope() as session:
        rows = session.execute(
            select(
                Agent.id,
                Agent.agent_id,
                Agent.status,
                Agent.max_concurrent_tasks,
                Agent.endpoint,
                Agent.auth_token_encrypted,
            ).where(
                Agent.deleted_at.is_(None),
                Agent.status != "offline",
                Agent.capabilities.contains([capability]),
            )
        ).all()
    found = [
        {
            "agentUuid": str(row.id),
            "agentId": row.agent_id,
            "status": row.status,
            "maxConcurrentTasks": row.max_concurrent_tasks,
            "endpoint": row.endpoint,
            # Only the ciphertext is cached; it is decrypted just before the call.
            "tokenEncrypted": row.auth_token_encrypted,
        }
        for row in rows
    ]
    cache.set_json(capability_cache_key(capability), found, get_settings().agent_cache_ttl_seconds)
    return found
