"""The candidate agents of each capability for each user (their own agents and shared
ones): read from Postgres, cached in Redis under the capability's generation, which every
committed change to its agents moves on. A list per user: no worker routing one user's
stage reads another user's private agents (their endpoints, their encrypted tokens), and
however many of them someone registers, no other user's stage pays to read them."""

from __future__ import annotations

import uuid
from contextlib import nullcontext
from typing import Any

from sqlalchemy import or_, select, text
from sqlalchemy.orm import Session

from chalicelib import cache
from chalicelib.config import get_settings
from chalicelib.db import session_scope
from chalicelib.db.models import Agent


def capability_cache_key(capability: str, owner: uuid.UUID | str) -> str:
    return f"maof:agents:capability:{capability}:{owner}"


def capability_generation_key(capability: str) -> str:
    return f"maof:agents:capability-gen:{capability}"


def invalidate_capability(capability: str) -> None:
    invalidate([capability])


# A capability's generation is kept this long after its last change (capability names are
# users' to make up: kept for ever, each name ever registered stayed in Redis). Once it is
# gone the generation reads 0 again, so it must outlive every list cached under 0 before
# that change: a list is cached at most MAOF_AGENT_CACHE_TTL_SECONDS (an hour at most) by
# a lookup that ends within its invocation (15 minutes at most). Lists cached under any
# other generation can never match again: a new key starts past every value (cache.bump).
GENERATION_KEPT_SECONDS = 2 * 3600


def invalidate(capabilities: list[str]) -> None:
    """After a change to agents with these capabilities is committed: move each one's
    generation on, so a list read before the change (even one cached after this call by a
    racing lookup) is never served again."""
    cache.bump(
        *[capability_generation_key(c) for c in capabilities], ttl_seconds=GENERATION_KEPT_SECONDS
    )


def candidates_uncached(
    capability: str,
    owner: uuid.UUID,
    generation: int | None = None,
    session: Session | None = None,
) -> list[dict[str, Any]]:
    """Live, not-offline agents declaring `capability` that may serve `owner`'s runs, read
    from Postgres (in `session`, if given, else in a session of its own) and cached for the
    next callers under `generation` (the capability's generation read before this lookup
    began; None: read it now)."""
    if generation is None:
        generation = cache.counter(capability_generation_key(capability))
    with (
        session_scope() if session is None else nullcontext(session) as reading,
        # In the caller's session, under a savepoint: a caller that carries on without this
        # read when it fails (waiting_reason) keeps a transaction it can still use.
        nullcontext() if session is None else reading.begin_nested(),
    ):
        rows = reading.execute(
            select(
                Agent.id,
                Agent.agent_id,
                Agent.owner_id,
                Agent.visibility,
                Agent.status,
                Agent.max_concurrent_tasks,
                Agent.endpoint,
                Agent.auth_token_encrypted,
            ).where(
                Agent.deleted_at.is_(None),
                Agent.status != "offline",
                Agent.capabilities.contains([capability]),
                or_(Agent.owner_id == owner, Agent.visibility == "shared"),
            )
        ).all()
    found = [
        {
            "agentUuid": str(row.id),
            "agentId": row.agent_id,
            "ownerUuid": str(row.owner_id),
            "visibility": row.visibility,
            "status": row.status,
            "maxConcurrentTasks": row.max_concurrent_tasks,
            "endpoint": row.endpoint,
            # Only the ciphertext is cached; it is decrypted just before the call.
            "tokenEncrypted": row.auth_token_encrypted,
        }
        for row in rows
    ]
    if generation is not None:
        cache.set_json(
            capability_cache_key(capability, owner),
            {"generation": generation, "agents": found},
            get_settings().agent_cache_ttl_seconds,
        )
    return found


def cached_candidates(entry: Any, generation: int | None) -> list[dict[str, Any]] | None:
    """The agents of a cache entry when it belongs to the current generation, else None."""
    if isinstance(entry, dict) and generation is not None and entry.get("generation") == generation:
        return list(entry["agents"])
    return None


def unshare_former_admins() -> int:
    """Make private every shared agent whose owner MAOF_ADMIN_USER_UUIDS no longer names
    (the sweeper's, each round): an account the operator stops naming keeps no agent that
    receives every user's stages. Returns how many agents changed."""
    with session_scope() as session:
        changed = session.execute(
            text(
                "UPDATE agents SET visibility = 'private', updated_at = now() "
                "WHERE visibility = 'shared' AND deleted_at IS NULL "
                "AND owner_id <> ALL (CAST(:admins AS uuid[])) RETURNING capabilities"
            ),
            {"admins": sorted(get_settings().admin_user_uuids)},
        ).all()
    invalidate(sorted({c for row in changed for c in row.capabilities}))
    return len(changed)


def serves(agent: dict[str, Any], owner: uuid.UUID) -> bool:
    """Whether a candidate agent may serve a run of `owner`: theirs, or shared."""
    return bool(agent["visibility"] == "shared" or agent["ownerUuid"] == str(owner))
