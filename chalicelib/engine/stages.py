"""The steps of running one stage, each testable alone against a real database:
claim → load inputs → (select and call an agent) → complete or fail → ready dependents.

Concurrency rules:
- claiming is one conditional UPDATE (queued → in_progress), so a duplicate SQS
  delivery finds nothing to claim and does nothing;
- completing or failing locks the run row first (SELECT … FOR UPDATE): the audit
  chain of a run grows one entry at a time and a fan-in stage is queued exactly once;
- finishing is conditional on the token of the claim, so a worker whose lease expired
  (and whose stage the sweeper handed to another) changes nothing;
- `attempt` is the logical attempt: redeliveries of one attempt (SQS, the sweeper) keep
  it, so the agent sees the same Idempotency-Key; only a retry or fallback moves it on.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from chalicelib.audit import chain
from chalicelib.config import get_settings
from chalicelib.db import autocommit_connection, session_scope
from chalicelib.db.models import AuditEntry
from chalicelib.engine import audit_rows
from chalicelib.http import dumps


@dataclass(frozen=True)
class ClaimedStage:
    id: uuid.UUID
    run_id: uuid.UUID
    owner_id: uuid.UUID  # the run's submitter: only their agents and shared ones serve it
    stage_id: str
    stage_name: str
    capability: str
    dependencies: list[str]
    input_template: Any
    config: dict[str, Any]
    attempt: int
    claim_token: uuid.UUID
    agent_uuid: uuid.UUID | None  # the agent of the previous attempt, if any
    agent_attempts: int  # attempts already made on that agent
    tried_agents: list[uuid.UUID]
    last_error: str | None  # of the previous attempt
    context: StageContext | None = None  # read by the claim, in the same statement


@dataclass(frozen=True)
class StageContext:
    workflow_name: str
    workflow_input: Any
    outputs: dict[str, Any]  # outputs of completed stages of the run, by stage id


def claim_stage(run_id: uuid.UUID, stage_id: str) -> ClaimedStage | None:
    """Take a queued, due stage for this worker, or None (a duplicate delivery, or not due).

    The lease covers the agent's timeout, so the sweeper never hands a stage to a
    second worker while the first may still be waiting on its agent.

    One statement, one round trip: the claim, the run's move to in_progress, and what
    the stage needs to run (the workflow input and the outputs of completed stages).
    """
    settings = get_settings()
    token = uuid.uuid4()
    with autocommit_connection() as conn:
        # A conditional UPDATE … RETURNING is the claim; the run is updated only when
        # the stage was claimed (same order as before: the stage row, then the run row).
        row = conn.execute(
            _CLAIM,
            {
                "run_id": run_id,
                "stage_id": stage_id,
                "token": token,
                "lease": settings.stage_lease_seconds,
                "timeout_ms": settings.agent_timeout_ms,
            },
        ).first()
    if row is None:
        return None
    return ClaimedStage(
        id=row.id,
        run_id=run_id,
        owner_id=row.owner_id,
        stage_id=stage_id,
        stage_name=row.stage_name,
        capability=row.capability,
        dependencies=list(row.dependencies),
        input_template=row.input_template,
        config=dict(row.config or {}),
        attempt=row.attempt,
        claim_token=token,
        agent_uuid=row.agent_uuid,
        agent_attempts=row.agent_attempts,
        tried_agents=list(row.tried_agents),
        last_error=row.error_message,
        context=StageContext(row.workflow_name, row.workflow_input, dict(row.outputs or {})),
    )


_CLAIM = text(
    """
    WITH claimed AS (
        UPDATE stage_executions
           SET status = 'in_progress', claim_token = :token,
               started_at = COALESCE(started_at, now()),
               lease_expires_at = now() + make_interval(secs => GREATEST(:lease,
                   COALESCE((config ->> 'timeoutMs')::numeric, :timeout_ms) / 1000 + 30))
         WHERE run_id = :run_id AND stage_id = :stage_id AND status = 'queued'
           AND (not_before IS NULL OR not_before <= now())
     RETURNING id, stage_name, capability, dependencies, input_template, config,
               attempt, agent_uuid, agent_attempts, tried_agents, error_message
    ), started AS (
        UPDATE workflow_runs SET status = 'in_progress', started_at = now(), updated_at = now()
         WHERE id = :run_id AND status = 'queued' AND EXISTS (SELECT 1 FROM claimed)
    )
    SELECT claimed.*, run.user_id AS owner_id, run.workflow_name, run.input AS workflow_input,
           (SELECT jsonb_object_agg(done.stage_id, done.output) FROM stage_executions AS done
             WHERE done.run_id = :run_id AND done.status = 'completed') AS outputs
      FROM claimed JOIN workflow_runs AS run ON run.id = :run_id
    """
)


class AssignResult(enum.Enum):
    ASSIGNED = "assigned"
    AGENT_INELIGIBLE = "agent-ineligible"  # deleted, or no longer visible to the run's owner
    CLAIM_LOST = "claim-lost"  # our lease expired and the stage moved on


def assign_agent(stage: ClaimedStage, agent_uuid: str, agent_id: str) -> AssignResult:
    """Record the agent chosen for this attempt, before it is called, if Postgres (the
    source of truth, whatever a cache said) agrees it may serve the run: live, and the
    submitter's own or shared. FOR SHARE waits for a delete or visibility change in flight,
    so once one has returned, no stage is assigned to the agent it excluded."""
    row = _one_statement(
        _ASSIGN,
        {
            "id": stage.id,
            "token": stage.claim_token,
            "agent_uuid": uuid.UUID(agent_uuid),
            "agent_id": agent_id,
        },
    )
    if not row.claimed:
        return AssignResult.CLAIM_LOST
    return AssignResult.ASSIGNED if row.assigned else AssignResult.AGENT_INELIGIBLE


_ASSIGN = text(
    """
    WITH mine AS (
        SELECT id, run_id FROM stage_executions
         WHERE id = :id AND status = 'in_progress' AND claim_token = :token
    ), allowed AS (
        SELECT 1 FROM agents AS a, workflow_runs AS r, mine
         WHERE r.id = mine.run_id AND a.id = :agent_uuid AND a.deleted_at IS NULL
           AND (a.visibility = 'shared' OR a.owner_id = r.user_id)
           FOR SHARE OF a
    ), assigned AS (
        UPDATE stage_executions SET agent_uuid = :agent_uuid, agent_id = :agent_id
         WHERE id IN (SELECT id FROM mine) AND EXISTS (SELECT 1 FROM allowed)
     RETURNING id
    )
    SELECT EXISTS (SELECT 1 FROM mine) AS claimed, EXISTS (SELECT 1 FROM assigned) AS assigned
    """
)


def _one_statement(statement: Any, params: dict[str, Any]) -> Any:
    with autocommit_connection() as conn:
        return conn.execute(statement, params).one()


def seconds_until_due(run_id: uuid.UUID, stage_id: str) -> float | None:
    """For a queued stage that is not due yet (backoff, waiting for capacity), how long
    until it is; None otherwise."""
    with session_scope() as session:
        remaining = session.execute(
            text(
                "SELECT EXTRACT(EPOCH FROM (not_before - now())) FROM stage_executions "
                "WHERE run_id = :run_id AND stage_id = :stage_id AND status = 'queued' "
                "AND not_before > now()"
            ),
            {"run_id": run_id, "stage_id": stage_id},
        ).scalar()
    return None if remaining is None else float(remaining)


def load_context(stage: ClaimedStage) -> StageContext:
    """The workflow input and the outputs of the run's completed stages (read with the
    claim; read again only for a stage claimed without them)."""
    if stage.context is not None:
        return stage.context
    with session_scope() as session:
        run = session.execute(
            text("SELECT workflow_name, input FROM workflow_runs WHERE id = :run_id"),
            {"run_id": stage.run_id},
        ).one()
        outputs = session.execute(
            text(
                "SELECT stage_id, output FROM stage_executions "
                "WHERE run_id = :run_id AND status = 'completed'"
            ),
            {"run_id": stage.run_id},
        ).all()
    return StageContext(run.workflow_name, run.input, {r.stage_id: r.output for r in outputs})


def default_input(stage: ClaimedStage, context: StageContext) -> Any:
    """A stage without `input` gets the workflow input (no dependencies) or its
    dependencies' outputs keyed by stage id."""
    if not stage.dependencies:
        return context.workflow_input
    return {dep: context.outputs.get(dep) for dep in stage.dependencies}


@dataclass(frozen=True)
class LockedRun:
    id: uuid.UUID
    status: str


def _lock_run(session: Session, run_id: uuid.UUID) -> LockedRun:
    """Take the run's row lock (only its status is read: not the definition or input)."""
    status = session.execute(
        text("SELECT status FROM workflow_runs WHERE id = :run_id FOR UPDATE"), {"run_id": run_id}
    ).scalar()
    assert status is not None, f"run {run_id} vanished"
    return LockedRun(run_id, status)


def complete_stage(
    stage: ClaimedStage, agent_uuid: str, agent_id: str, stage_input: Any, output: Any
) -> list[str]:
    """Store the output, audit it, queue the dependents that became ready, and finish
    the run when every stage is done. Returns the stage ids to send messages for.

    Under the run's lock, in as few round trips as Postgres allows: the stage's update
    also reads the head of the audit chain; the audit entry's insert also queues the
    ready dependents and counts the stages still open."""
    with session_scope() as session:
        run = _lock_run(session, stage.run_id)
        updated = session.execute(
            _COMPLETE,
            {
                "id": stage.id,
                "run_id": stage.run_id,
                "token": stage.claim_token,
                "output": _json(output),
                "input": _json(stage_input),
                "agent_uuid": uuid.UUID(agent_uuid),
                "agent_id": agent_id,
            },
        ).first()
        if updated is None:
            return []  # our lease expired and the stage moved on without us
        duration_ms = int((updated.completed_at - updated.started_at).total_seconds() * 1000)
        entry = chain.next_entry(
            stage.run_id,
            updated.last_seq,
            updated.last_hash,
            "execute",
            "completed",
            stage_id=stage.stage_id,
            agent_id=agent_id,
            input_hash=chain.sha256_json(stage_input),
            output_hash=chain.sha256_json(output),
            details={"attempt": stage.attempt, "durationMs": duration_ms},
        )
        if run.status not in ("queued", "in_progress"):
            session.execute(audit_rows.INSERT, audit_rows.params(entry))
            return []
        advanced = session.execute(
            _APPEND_AND_ADVANCE, {**audit_rows.params(entry), "run_id": stage.run_id}
        ).one()
        ready = list(advanced.ready or [])
        if not ready and advanced.still_open == 0:
            finish_run(session, run, entry)
        return ready


# The stage's completion, conditional on our claim, and the head of the run's audit chain
# (read after the run lock was taken, so no other entry can follow it meanwhile).
_COMPLETE = text(
    """
    WITH done AS (
        UPDATE stage_executions
           SET status = 'completed', output = CAST(:output AS jsonb),
               input = CAST(:input AS jsonb), agent_uuid = :agent_uuid,
               agent_id = :agent_id, completed_at = now(), lease_expires_at = NULL
         WHERE id = :id AND status = 'in_progress' AND claim_token = :token
     RETURNING started_at, completed_at
    )
    SELECT done.started_at, done.completed_at, head.seq AS last_seq, head.entry_hash AS last_hash
      FROM done LEFT JOIN LATERAL (
           SELECT seq, entry_hash FROM execution_logs
            WHERE run_id = :run_id ORDER BY seq DESC LIMIT 1) AS head ON true
    """
)


# Every pending stage whose dependencies are all completed becomes queued.
_READY = """
    UPDATE stage_executions AS s
       SET status = 'queued', queued_at = now()
     WHERE s.run_id = :run_id AND s.status = 'pending'
       AND NOT EXISTS (
           SELECT 1 FROM stage_executions AS d
            WHERE d.run_id = s.run_id AND d.stage_id = ANY (s.dependencies)
              AND d.status <> 'completed')
 RETURNING s.stage_id
"""

# The audit entry, the ready dependents, and how many stages are not completed yet.
_APPEND_AND_ADVANCE = text(
    f"""
    WITH entry AS (INSERT INTO execution_logs ({audit_rows.COLUMNS}) VALUES ({audit_rows.VALUES})),
         ready AS ({_READY})
    SELECT (SELECT array_agg(stage_id) FROM ready) AS ready,
           (SELECT count(*) FROM stage_executions
             WHERE run_id = :run_id AND status <> 'completed') AS still_open
    """
)


def finish_run(session: Session, run: LockedRun, last: AuditEntry) -> None:
    """Complete the run, whose stages are all completed (the caller counted them under the
    run lock); its output is that of the final stage(s), those nothing depends on.
    `last` is the run's newest audit entry (written in this transaction)."""
    sinks = session.execute(
        text(
            "SELECT s.stage_id, s.output FROM stage_executions AS s "
            "WHERE s.run_id = :run_id AND NOT EXISTS ("
            "    SELECT 1 FROM stage_executions AS d "
            "     WHERE d.run_id = s.run_id AND s.stage_id = ANY (d.dependencies)) "
            "ORDER BY s.position"
        ),
        {"run_id": run.id},
    ).all()
    output = sinks[0].output if len(sinks) == 1 else {row.stage_id: row.output for row in sinks}
    entry = chain.next_entry(
        run.id,
        last.seq,
        last.entry_hash,
        "complete",
        "completed",
        output_hash=chain.sha256_json(output),
    )
    session.execute(
        text(
            f"WITH entry AS (INSERT INTO execution_logs ({audit_rows.COLUMNS}) "
            f"VALUES ({audit_rows.VALUES})) "
            "UPDATE workflow_runs SET status = 'completed', output = CAST(:output AS jsonb), "
            "completed_at = now(), updated_at = now() WHERE id = :run_id"
        ),
        {**audit_rows.params(entry), "run_id": run.id, "output": _json(output)},
    )


def fail_stage(
    stage: ClaimedStage, reason: str, agent_id: str | None = None, stage_input: Any = None
) -> bool:
    """Fail the stage and its run; stages not yet started are skipped. Returns False if
    the stage was no longer ours to fail."""
    with session_scope() as session:
        run = _lock_run(session, stage.run_id)
        updated = session.execute(
            text(
                """
                UPDATE stage_executions
                   SET status = 'failed', error_message = :reason, agent_id = :agent_id,
                       input = CAST(:input AS jsonb), completed_at = now(),
                       lease_expires_at = NULL
                 WHERE id = :id AND status = 'in_progress' AND claim_token = :token
             RETURNING id
                """
            ),
            {
                "id": stage.id,
                "token": stage.claim_token,
                "reason": reason,
                "agent_id": agent_id,
                "input": _json(stage_input),
            },
        ).first()
        if updated is None:
            return False
        chain.append(
            session,
            stage.run_id,
            "fail",
            "failed",
            stage_id=stage.stage_id,
            agent_id=agent_id,
            details={"attempt": stage.attempt, "error": reason},
        )
        if run.status in ("queued", "in_progress"):
            skipped = session.execute(
                text(
                    "UPDATE stage_executions SET status = 'skipped', completed_at = now() "
                    "WHERE run_id = :run_id AND status IN ('pending', 'queued') "
                    "RETURNING stage_id, position"
                ),
                {"run_id": stage.run_id},
            ).all()
            for row in sorted(skipped, key=lambda r: r.position):
                chain.append(
                    session,
                    stage.run_id,
                    "skip",
                    "skipped",
                    stage_id=row.stage_id,
                    details={"reason": f"stage '{stage.stage_id}' failed"},
                )
            message = f"Stage '{stage.stage_id}' ({stage.stage_name}) failed: {reason}"
            session.execute(
                text(
                    "UPDATE workflow_runs SET status = 'failed', error_message = :message, "
                    "completed_at = now(), updated_at = now() WHERE id = :run_id"
                ),
                {"run_id": stage.run_id, "message": message},
            )
    return True


def _json(value: Any) -> str | None:
    return None if value is None else dumps(value)


def release_stage(stage: ClaimedStage) -> None:
    """Hand a claimed stage back to the queue after an unexpected error (redelivery retries
    the same attempt)."""
    with session_scope() as session:
        session.execute(
            text(
                "UPDATE stage_executions SET status = 'queued', queued_at = now(), "
                "lease_expires_at = NULL, claim_token = NULL "
                "WHERE id = :id AND status = 'in_progress' AND claim_token = :token"
            ),
            {"id": stage.id, "token": stage.claim_token},
        )


def requeue_later(
    stage: ClaimedStage,
    delay_ms: int,
    action: str,
    *,
    agent_uuid: uuid.UUID | None,
    agent_id: str | None,
    agent_attempts: int,
    tried_agents: list[uuid.UUID],
    next_attempt: bool,
    details: dict[str, Any],
) -> bool:
    """Put the stage back in the queue, due in `delay_ms`, with an audit entry `action`
    (retry, fallback or wait). Returns False if the stage was no longer ours."""
    with session_scope() as session:
        _lock_run(session, stage.run_id)
        updated = session.execute(
            text(
                """
                UPDATE stage_executions
                   SET status = 'queued', queued_at = now(), lease_expires_at = NULL,
                       claim_token = NULL,
                       not_before = now() + make_interval(secs => :delay_ms / 1000.0),
                       attempt = attempt + :bump, agent_uuid = :agent_uuid, agent_id = :agent_id,
                       agent_attempts = :agent_attempts, tried_agents = :tried_agents,
                       error_message = :error
                 WHERE id = :id AND status = 'in_progress' AND claim_token = :token
             RETURNING attempt
                """
            ),
            {
                "id": stage.id,
                "token": stage.claim_token,
                "delay_ms": delay_ms,
                "bump": 1 if next_attempt else 0,
                "agent_uuid": agent_uuid,
                "agent_id": agent_id,
                "agent_attempts": agent_attempts,
                "tried_agents": tried_agents,
                "error": details.get("error"),
            },
        ).first()
        if updated is None:
            return False
        chain.append(
            session,
            stage.run_id,
            action,
            "queued",
            stage_id=stage.stage_id,
            agent_id=agent_id,
            details={
                **details,
                "attempt": stage.attempt,
                "nextAttempt": updated.attempt,
                "delayMs": delay_ms,
            },
        )
    return True
