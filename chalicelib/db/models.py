"""Typed SQLAlchemy models of every table (the migrations create the same schema)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def _uuid_pk() -> Mapped[uuid.UUID]:
    return mapped_column(
        UUID(as_uuid=True), primary_key=True, server_default=text("gen_random_uuid()")
    )


def _now() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[uuid.UUID] = _uuid_pk()
    email: Mapped[str] = mapped_column(String(255), nullable=False, unique=True)
    password_hash: Mapped[str] = mapped_column(String(100), nullable=False)
    name: Mapped[str] = mapped_column(String(255), nullable=False)
    role: Mapped[str] = mapped_column(String(20), nullable=False, server_default="user")
    # Bumped to end every session of the user at once (access tokens carry it as `ver`).
    token_version: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()

    __table_args__ = (CheckConstraint("email = lower(email)", name="users_email_lower"),)


class AuthSession(Base):
    """One sign-in: a family of refresh tokens of which only the newest (current_jti) is valid."""

    __tablename__ = "auth_sessions"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=False
    )
    current_jti: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    created_at: Mapped[datetime] = _now()
    refreshed_at: Mapped[datetime] = _now()
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_reason: Mapped[str | None] = mapped_column(String(40))

    __table_args__ = (
        Index("auth_sessions_user_live", "user_id", postgresql_where=text("revoked_at IS NULL")),
        Index("auth_sessions_expires_at", "expires_at"),
    )


class Agent(Base):
    __tablename__ = "agents"

    id: Mapped[uuid.UUID] = _uuid_pk()
    agent_id: Mapped[str] = mapped_column(String(255), nullable=False)
    owner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"), nullable=False)
    name: Mapped[str] = mapped_column(String(255), nullable=False)
    description: Mapped[str | None] = mapped_column(Text)
    endpoint: Mapped[str] = mapped_column(String(2048), nullable=False)
    # None once the agent is deleted: nothing calls it again.
    auth_token_encrypted: Mapped[str | None] = mapped_column(Text)
    capabilities: Mapped[list[str]] = mapped_column(ARRAY(String(100)), nullable=False)
    max_concurrent_tasks: Mapped[int] = mapped_column(Integer, nullable=False, server_default="5")
    status: Mapped[str] = mapped_column(String(20), nullable=False, server_default="online")
    # private: serves only its owner's runs; shared (set by an admin): serves everyone's.
    visibility: Mapped[str] = mapped_column(String(10), nullable=False, server_default="private")
    last_health_check: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        CheckConstraint("status IN ('online', 'degraded', 'offline')", name="agents_status"),
        CheckConstraint("visibility IN ('private', 'shared')", name="agents_visibility"),
        # agentId is unique among its owner's live agents; a deleted agent frees its id.
        Index(
            "agents_owner_agent_id_live",
            "owner_id",
            "agent_id",
            unique=True,
            postgresql_where=text("deleted_at IS NULL"),
        ),
        Index("agents_capabilities_gin", "capabilities", postgresql_using="gin"),
        Index("agents_created_at", "created_at"),
    )


class WorkflowRun(Base):
    __tablename__ = "workflow_runs"

    id: Mapped[uuid.UUID] = _uuid_pk()
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"), nullable=False)
    workflow_name: Mapped[str] = mapped_column(String(255), nullable=False)
    definition: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    input: Mapped[Any] = mapped_column(JSONB)
    status: Mapped[str] = mapped_column(String(20), nullable=False, server_default="queued")
    output: Mapped[Any] = mapped_column(JSONB)
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = _now()
    # When one of its stages last got an agent's slot (round-robin hand-offs).
    served_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # workflow.timeoutMs from when it was submitted (or retried).
    deadline_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The completion callback and the state of its delivery (pending, delivered, failed).
    callback_url: Mapped[str | None] = mapped_column(String(2048))
    callback_secret_encrypted: Mapped[str | None] = mapped_column(Text)
    callback_state: Mapped[str | None] = mapped_column(String(20))
    callback_attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    callback_next_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    callback_delivery: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    callback_error: Mapped[str | None] = mapped_column(Text)
    # Bytes of completed stages' inputs and outputs stored so far (capped by
    # MAOF_RUN_MAX_OUTPUT_BYTES).
    output_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")

    __table_args__ = (
        CheckConstraint(
            "status IN ('queued', 'in_progress', 'completed', 'failed', 'cancelled')",
            name="workflow_runs_status",
        ),
        Index("workflow_runs_user_created", "user_id", text("created_at DESC")),
        Index("workflow_runs_user_status_created", "user_id", "status", text("created_at DESC")),
        Index(
            "workflow_runs_user_completed",
            "user_id",
            "completed_at",
            postgresql_where=text("completed_at IS NOT NULL"),
        ),
        Index(
            "workflow_runs_callbacks_due",
            "callback_next_at",
            postgresql_where=text("callback_state = 'pending'"),
        ),
        Index(
            "workflow_runs_deadlines",
            "deadline_at",
            postgresql_where=text(
                "status IN ('queued', 'in_progress') AND deadline_at IS NOT NULL"
            ),
        ),
    )


class StageExecution(Base):
    __tablename__ = "stage_executions"

    id: Mapped[uuid.UUID] = _uuid_pk()
    run_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False
    )
    stage_id: Mapped[str] = mapped_column(String(100), nullable=False)
    stage_name: Mapped[str] = mapped_column(String(255), nullable=False)
    position: Mapped[int] = mapped_column(Integer, nullable=False)
    capability: Mapped[str] = mapped_column(String(100), nullable=False)
    dependencies: Mapped[list[str]] = mapped_column(ARRAY(String(100)), nullable=False)
    input_template: Mapped[Any] = mapped_column(JSONB)
    config: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    status: Mapped[str] = mapped_column(String(20), nullable=False)
    agent_uuid: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("agents.id"))
    agent_id: Mapped[str | None] = mapped_column(String(255))
    input: Mapped[Any] = mapped_column(JSONB)
    output: Mapped[Any] = mapped_column(JSONB)
    error_message: Mapped[str | None] = mapped_column(Text)
    # The logical attempt (1, 2, …): the last part of the agent's Idempotency-Key.
    attempt: Mapped[int] = mapped_column(Integer, nullable=False, server_default="1")
    claim_token: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    not_before: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    agent_attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    tried_agents: Mapped[list[uuid.UUID]] = mapped_column(
        ARRAY(UUID(as_uuid=True)), nullable=False, server_default="{}"
    )
    # Every way round again is counted and bounded (engine/policy.py).
    errors: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    lease_expiries: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    requeues: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    waits: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    # When it began to wait for an agent's slot (status waiting); kept while it waits,
    # woken and claimed included, until an agent is assigned to it.
    parked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The stages whose outputs the input reads (NULL: every completed stage).
    needs: Mapped[list[str] | None] = mapped_column(ARRAY(String(100)))
    queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("run_id", "stage_id", name="stage_executions_run_stage"),
        CheckConstraint(
            "status IN ('pending', 'queued', 'waiting', 'in_progress', 'completed', 'failed', "
            "'skipped', 'cancelled')",
            name="stage_executions_status",
        ),
        # A freed slot finds the runs waiting for its agent's capabilities, then each
        # run's first stage in line, without reading every waiting stage.
        Index(
            "stage_executions_waiting_runs",
            "capability",
            "run_id",
            "parked_at",
            "id",
            postgresql_where=text("status = 'waiting'"),
        ),
        # The sweeper looks for stages stuck in 'queued' or with an expired lease.
        Index(
            "stage_executions_sweep",
            "status",
            "queued_at",
            "lease_expires_at",
            postgresql_where=text("status IN ('queued', 'in_progress')"),
        ),
        # Each worker renews the leases of the stages it holds, by their claim tokens.
        Index(
            "stage_executions_claims",
            "claim_token",
            postgresql_where=text("status = 'in_progress'"),
        ),
        # A freed slot goes first to the user with the fewest stages in progress on it.
        Index(
            "stage_executions_on_agent",
            "agent_uuid",
            postgresql_where=text("status = 'in_progress'"),
        ),
        # Then to the run with the fewest stages in progress (the one releasing aside).
        Index(
            "stage_executions_in_progress_runs",
            "run_id",
            "claim_token",
            postgresql_where=text("status = 'in_progress'"),
        ),
    )


# How long an Idempotency-Key is remembered; the sweeper deletes keys older than that.
SUBMISSION_KEY_DAYS = 1


class SubmissionKey(Base):
    """The Idempotency-Key of a submission: the same key and body give the same run."""

    __tablename__ = "submission_keys"

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    body_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    run_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    created_at: Mapped[datetime] = _now()

    __table_args__ = (Index("submission_keys_created_at", "created_at"),)


class AuditEntry(Base):
    """One row of the append-only, hash-chained audit trail of a run."""

    __tablename__ = "execution_logs"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workflow_runs.id"), nullable=False)
    seq: Mapped[int] = mapped_column(Integer, nullable=False)
    stage_id: Mapped[str | None] = mapped_column(String(100))
    agent_id: Mapped[str | None] = mapped_column(String(255))
    action: Mapped[str] = mapped_column(String(40), nullable=False)
    status: Mapped[str] = mapped_column(String(40), nullable=False)
    input_hash: Mapped[str | None] = mapped_column(String(64))
    output_hash: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    logged_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    prev_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    entry_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    # 1: the hash rule before signing (no kid, no signature); 2: audit/verify.py's rule.
    version: Mapped[int] = mapped_column(SmallInteger, nullable=False, server_default="1")
    kid: Mapped[str | None] = mapped_column(String(64))
    signature: Mapped[str | None] = mapped_column(String(128))

    __table_args__ = (UniqueConstraint("run_id", "seq", name="execution_logs_run_seq"),)
