"""Register, list, read, change and (soft) delete agents; a new agent is probed at once."""

from __future__ import annotations

import functools
import unicodedata
import uuid
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import Field, field_validator
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from chalicelib import limits
from chalicelib.agents import health
from chalicelib.agents.candidates import invalidate
from chalicelib.agents.dispatch import is_mock
from chalicelib.agents.mock import MOCK_AGENTS_DISABLED, mock_agents_enabled
from chalicelib.agents.network import EndpointNotAllowed, check_endpoint_allowed
from chalicelib.agents.secrets import encrypt_token
from chalicelib.auth.service import is_admin
from chalicelib.config import get_settings
from chalicelib.core import errors, responses
from chalicelib.core.api import ApiModel, JsonInteger, PageQuery, Principal, page_meta
from chalicelib.core.capabilities import Capability
from chalicelib.db import insert_unique, is_unavailable, session_scope
from chalicelib.db.models import Agent, User
from chalicelib.logs import logger

Visibility = Literal["private", "shared"]
# What a terminal or a text display acts on rather than shows: controls (Cc: ESC, C1's
# CSI), format characters (Cf: bidi overrides and isolates that show text reversed,
# zero-width characters) and line and paragraph separators (Zl, Zp).
HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def hidden_characters(value: str, allowed: str = "") -> bool:
    """Whether `value` holds a character of HIDDEN_CATEGORIES other than those `allowed`."""
    return any(
        unicodedata.category(char) in HIDDEN_CATEGORIES and char not in allowed for char in value
    )


class RegisterAgentRequest(ApiModel):
    agent_id: str = Field(min_length=1, max_length=255)
    name: str = Field(min_length=1, max_length=255)
    endpoint: str = Field(min_length=1, max_length=2048)
    auth_token: str = Field(min_length=1, max_length=1024, repr=False)
    capabilities: list[Capability] = Field(min_length=1, max_length=50)
    description: str | None = Field(default=None, max_length=2000)
    max_concurrent_tasks: JsonInteger = Field(default=5, ge=1, le=100)
    visibility: Visibility = "private"

    @field_validator("endpoint")
    @classmethod
    def _absolute_http_url(cls, value: str) -> str:
        if "#" in value:
            # Never sent (tasks and probes go to the path and query): it would only mislead.
            raise ValueError("must not contain a fragment (#...)")
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

    @field_validator("auth_token")
    @classmethod
    def _sendable(cls, value: str) -> str:
        # Sent as `Authorization: Bearer <token>`: HTTP carries Latin-1 at most, and tokens
        # are printable ASCII. Never echoed, not even in part.
        if not all(" " <= char <= "~" for char in value):
            raise ValueError("must be printable ASCII (it is sent in an HTTP header)")
        return value

    @field_validator("agent_id", "name")
    @classmethod
    def _no_controls(cls, value: str) -> str:
        # Shown to other users (a shared agent, in their runs) and on terminals, where a
        # control character (ESC, C1's CSI) would be acted on rather than shown, and a bidi
        # override would show another name than the one stored.
        if hidden_characters(value):
            raise ValueError("must not contain control or invisible formatting characters")
        return value

    @field_validator("description")
    @classmethod
    def _no_controls_but_lines(cls, value: str | None) -> str | None:
        # Listed to the same users as the name; it may run over several lines.
        if value is not None and hidden_characters(value, allowed="\t\n"):
            raise ValueError(
                "must not contain control or invisible formatting characters "
                "(tab and newline are allowed)"
            )
        return value


class UpdateAgentRequest(ApiModel):
    visibility: Visibility


class AgentQuery(PageQuery):
    capability: Capability | None = None
    status: Literal["online", "degraded", "offline"] | None = None


def agent_view(agent: Agent, viewer: Principal | None = None) -> responses.Agent:
    """The public shape of an agent; the auth token is never part of it, and a shared
    agent seen by someone other than its owner shows neither its endpoint nor its owner."""
    owner_only: dict[str, Any] = {}
    if viewer is None or viewer.user_uuid == agent.owner_id:
        owner_only = {"endpoint": agent.endpoint, "owner_user_uuid": agent.owner_id}
    return responses.Agent(
        agent_uuid=agent.id,
        agent_id=agent.agent_id,
        name=agent.name,
        description=agent.description,
        capabilities=agent.capabilities,
        max_concurrent_tasks=agent.max_concurrent_tasks,
        status=agent.status,
        visibility=agent.visibility,
        last_health_check=agent.last_health_check,
        created_at=agent.created_at,
        updated_at=agent.updated_at,
        **owner_only,
    )


def _refuse_sharing(principal: Principal, visibility: str) -> None:
    if visibility == "shared" and not is_admin(principal.user_uuid):
        raise errors.Forbidden(
            "Only an admin can share an agent",
            [{"field": "visibility", "message": "only an admin may set 'shared'"}],
        )


def _within_quota(owner: uuid.UUID, session: Session) -> None:
    """At most MAOF_MAX_AGENTS_PER_USER live agents per account: each is probed every
    health interval, so agents by the thousand would make MAOF send requests by the
    thousand to whatever they name, and delay everyone's checks. The owner's row is
    locked, so two registrations at once cannot both take the last place (FOR NO KEY
    UPDATE: the owner's other inserts, whose foreign keys lock it FOR KEY SHARE, go on)."""
    cap = get_settings().max_agents_per_user
    session.execute(select(User.id).where(User.id == owner).with_for_update(key_share=True))
    live = session.scalar(
        select(func.count()).where(Agent.owner_id == owner, Agent.deleted_at.is_(None))
    )
    if (live or 0) >= cap:
        raise errors.Conflict(
            f"You have {live} agents, the most allowed (MAOF_MAX_AGENTS_PER_USER); "
            "delete one first",
            [{"field": "body", "message": f"at most {cap} agents per account"}],
        )


def _count_probe(principal: Principal, endpoint: str) -> None:
    """Count a probe the caller asks for (MAOF_HEALTH_CHECKS_PER_MINUTE), or 429; a mock
    agent's probe sends no request and is not counted."""
    if not is_mock(endpoint):
        limits.limit_health_checks(str(principal.user_uuid))


def register(
    principal: Principal, body: RegisterAgentRequest, available: health.Available | None = None
) -> responses.Agent:
    """Register an agent, probe it, and (unless the probe found it offline) tell
    `available` of it: stages may be waiting for what it serves. Once stored, it is
    answered (201) even if deleted before its probe ends, or if the database goes away
    before its probe is recorded."""
    _refuse_sharing(principal, body.visibility)
    # Registering probes at once; counted first, so a refused registration makes no agent
    # (a register and delete loop would otherwise probe without limit).
    _count_probe(principal, body.endpoint)
    agent = Agent(
        agent_id=body.agent_id,
        owner_id=principal.user_uuid,
        name=body.name,
        description=body.description,
        endpoint=body.endpoint,
        auth_token_encrypted=encrypt_token(body.auth_token),
        capabilities=body.capabilities,
        max_concurrent_tasks=body.max_concurrent_tasks,
        visibility=body.visibility,
        # Until a probe is recorded: never checked, it is not routed to (protocol.md).
        status="offline",
    )
    insert_unique(
        agent,
        errors.Conflict(
            f"You already have an agent with agentId '{body.agent_id}'",
            [{"field": "agentId", "message": "already one of your agents"}],
        ),
        check=functools.partial(_within_quota, principal.user_uuid),
    )
    invalidate(agent.capabilities)
    # A new agent is checked at once, so its status is real from the start.
    try:
        view = _probe(agent)
    except Exception as exc:
        if not is_unavailable(exc):
            raise
        # Stored, but the database went away before the probe was recorded: a 503 would
        # have its client try again, and get 409 for an agent it was told was not
        # registered. It is answered as stored (offline, never checked); the scheduled
        # check takes never-checked agents first.
        logger.warning("a new agent's probe was not recorded", extra={"error": type(exc).__name__})
        return agent_view(agent)
    if view is None:
        # Deleted while probed (its owner's other clients list it at once): it was
        # registered, and is answered as stored, as it would have been just before.
        return agent_view(agent)
    if available is not None and view.status != "offline":
        available(agent.id, agent.max_concurrent_tasks)
    return view


def _probe(agent: Agent, available: health.Available | None = None) -> responses.Agent | None:
    """Probe an agent (its owner asked) and return the owner's view of it, or None if it
    was deleted meanwhile (nothing is recorded then)."""
    checked = health.check([(agent.id, agent.endpoint)], available)
    return agent_view(checked[0]) if checked else None


def check_health(
    principal: Principal, agent_uuid: str, available: health.Available | None = None
) -> responses.Agent:
    """Probe one of the caller's agents now and return it with its new status (`available`:
    told of it if it is back from offline)."""
    with session_scope() as session:
        agent = _owned_agent(session, principal, agent_uuid, "check its health")
    _count_probe(principal, agent.endpoint)
    view = _probe(agent, available)
    if view is None:
        raise errors.NotFound("Agent not found")
    return view


def _visible(principal: Principal) -> ColumnElement[bool]:
    """The agents a user may see: their own, and shared ones."""
    return or_(Agent.owner_id == principal.user_uuid, Agent.visibility == "shared")


def list_agents(principal: Principal, query: AgentQuery) -> responses.AgentList:
    conditions: list[ColumnElement[bool]] = [Agent.deleted_at.is_(None), _visible(principal)]
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
    return responses.AgentList(
        agents=[agent_view(a, principal) for a in agents],
        meta=responses.PageMeta(**page_meta(total, query)),
    )


def parse_uuid(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise errors.NotFound(f"{what} not found") from None


def _visible_agent(session: Session, principal: Principal, agent_uuid: str) -> Agent:
    """A live agent the caller may see; 404 for others' private agents, as for unknown ones."""
    agent = session.scalar(
        select(Agent).where(
            Agent.id == parse_uuid(agent_uuid, "Agent"),
            Agent.deleted_at.is_(None),
            _visible(principal),
        )
    )
    if agent is None:
        raise errors.NotFound("Agent not found")
    return agent


def _owned_agent(session: Session, principal: Principal, agent_uuid: str, action: str) -> Agent:
    """A live agent of the caller's, locked; 404 if invisible, 403 if shared by another."""
    agent = _visible_agent(session, principal, agent_uuid)
    if agent.owner_id != principal.user_uuid:
        raise errors.Forbidden(f"Only the agent's owner can {action}")
    session.refresh(agent, with_for_update=True)
    if agent.deleted_at is not None:
        raise errors.NotFound("Agent not found")
    return agent


def get_agent(principal: Principal, agent_uuid: str) -> responses.Agent:
    with session_scope() as session:
        return agent_view(_visible_agent(session, principal, agent_uuid), principal)


def update_agent(
    principal: Principal,
    agent_uuid: str,
    body: UpdateAgentRequest,
    available: health.Available | None = None,
) -> responses.Agent:
    """Change an agent's visibility (sharing needs an admin). Once this returns, a run the
    agent may no longer serve gets no new stage from it; shared now (and not offline), it
    tells `available` of it: other users' stages may be waiting for what it serves."""
    with session_scope() as session:
        # The agent first: to anyone but its owner this answers as every agent route does
        # (404, or 403 for a shared agent), whatever the body asks for.
        agent = _owned_agent(session, principal, agent_uuid, "change it")
        _refuse_sharing(principal, body.visibility)
        shared_now = agent.visibility != "shared" and body.visibility == "shared"
        agent.visibility = body.visibility
        agent.updated_at = datetime.now(UTC)
        session.flush()
        view = agent_view(agent, principal)
        capabilities = list(agent.capabilities)
        slots = agent.max_concurrent_tasks
    invalidate(capabilities)
    if available is not None and shared_now and view.status != "offline":
        available(view.agent_uuid, slots)
    return view


def delete_agent(principal: Principal, agent_uuid: str) -> responses.AgentDeleted:
    """Soft-delete one of the caller's agents: once this returns it gets no new stage, and
    its token is no longer stored (a stage already calling it holds the token it read with
    the agent's candidate list)."""
    with session_scope() as session:
        agent = _owned_agent(session, principal, agent_uuid, "delete it")
        session.execute(
            update(Agent)
            .where(Agent.id == agent.id)
            .values(deleted_at=datetime.now(UTC), auth_token_encrypted=None, updated_at=func.now())
        )
        capabilities = list(agent.capabilities)
    invalidate(capabilities)
    return responses.AgentDeleted(agent_uuid=agent_uuid, deleted=True)
