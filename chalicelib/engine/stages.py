"""The steps of running one stage, each testable alone against a real database:
claim → load inputs → (select and call an agent) → complete or fail → ready dependents.

Concurrency rules:
- one lock order everywhere: the run row, then stage rows (the claim takes the run row
  first too), so a claim, a completion, a failure and the sweeper never deadlock;
- claiming is one conditional UPDATE (queued → in_progress) of a stage of a run still
  queued or in progress, so a duplicate SQS delivery, or a message for a run that has
  ended, finds nothing to claim and does nothing;
- a claim is a lease that its worker renews while it runs (leases.py), so a dead worker's
  stage is handed on within MAOF_STAGE_LEASE_SECONDS, however long the agent may take;
- completing or failing locks the run row first (SELECT … FOR UPDATE): the audit
  chain of a run grows one entry at a time and a fan-in stage is queued exactly once;
- finishing is conditional on the token of the claim, so a worker whose lease expired
  and whose stage another worker has claimed since changes nothing; the sweeper's
  re-queue keeps the token (only a new claim replaces it), so a worker that was late,
  not dead, and whose agent answers before anyone claimed the stage again still
  completes or fails it (_ENDS_OUR_CLAIM), and the re-sent message finds it done;
- `attempt` is the logical attempt: redeliveries of one attempt (SQS, the sweeper) keep
  it, so the agent sees the same Idempotency-Key; only a retry or fallback moves it on.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from chalicelib.audit import chain
from chalicelib.audit import rows as audit_rows
from chalicelib.config import get_settings
from chalicelib.core.encoding import dumps, served_size
from chalicelib.db import autocommit_connection, session_scope
from chalicelib.db.models import AuditEntry


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
    errors: int = 0  # unexpected exceptions so far (policy.py)
    waits: int = 0  # capacity waits so far
    needs: list[str] | None = None  # stages whose outputs the input reads (None: all)
    deadline_in: float | None = None  # seconds to the run's deadline at the claim
    context: StageContext | None = None  # read by the claim, in the same statement


@dataclass(frozen=True)
class StageContext:
    workflow_name: str
    workflow_input: Any
    outputs: dict[str, Any]  # outputs of the completed stages it needs, by stage id


def claim_stage(run_id: uuid.UUID, stage_id: str, *, waiting: bool = False) -> ClaimedStage | None:
    """Take a queued, due stage (or, with `waiting`, one waiting for a slot) of a live run
    for this worker, or None (a duplicate delivery, a stage not due yet, a run that has
    ended, or a waiting stage someone else took first).

    One statement, one round trip: the claim, the run's move to in_progress, and what
    the stage needs to run (the workflow input and the outputs its input reads).
    """
    return _claim(_CLAIM_WAITING if waiting else _CLAIM, {"run_id": run_id, "stage_id": stage_id})


# A waiting stage can be taken by another worker between our choice and our claim.
CLAIM_NEXT_WAITING_TRIES = 3


def claim_next_waiting(agent_uuid: str, releasing: uuid.UUID | None = None) -> ClaimedStage | None:
    """Take the first of the stages waiting for this agent, in next_waiting's order, or
    None when none waits. One statement chooses and claims; a stage another worker took
    meanwhile is not claimed, and the next one is chosen (a few times at most)."""
    params = {"agent_uuid": uuid.UUID(agent_uuid), "releasing": releasing}
    for _ in range(CLAIM_NEXT_WAITING_TRIES):
        token = uuid.uuid4()
        row = _claim_row(_CLAIM_NEXT_WAITING, params, token)
        if row is None:
            return None  # none waits for this agent
        if row.id is not None:
            return _claimed(row, token)
    return None


def _claim(statement: Any, params: dict[str, Any]) -> ClaimedStage | None:
    token = uuid.uuid4()
    row = _claim_row(statement, params, token)
    return None if row is None else _claimed(row, token)


def _claim_row(statement: Any, params: dict[str, Any], token: uuid.UUID) -> Any:
    with autocommit_connection() as conn:
        return conn.execute(
            statement, {**params, "token": token, "lease": get_settings().stage_lease_seconds}
        ).first()


def _claimed(row: Any, token: uuid.UUID) -> ClaimedStage:
    return ClaimedStage(
        id=row.id,
        run_id=row.run_id,
        owner_id=row.owner_id,
        stage_id=row.stage_id,
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
        errors=row.errors,
        waits=row.waits,
        needs=None if row.needs is None else list(row.needs),
        deadline_in=None if row.deadline_in is None else float(row.deadline_in),
        context=StageContext(row.workflow_name, row.workflow_input, dict(row.outputs or {})),
    )


# The run row is locked first (the scalar subquery on `run` is evaluated before the
# UPDATE touches a stage row): the same order as every other writer. Only the outputs
# the stage needs are read: a stage of a wide run does not drag every output along.
# {run_id} and {stage_id} say which stage: parameters, or the `candidate` row that a
# statement put first ({candidate}) chose; {rows} is one row per claim (or, for a
# candidate, one row however the claim went: its claimed columns NULL if it was lost).
# parked_at is kept: a stage woken to find the agents full again waits in its old place.
_CLAIM_SQL = """
    WITH {candidate} run AS MATERIALIZED (
        SELECT id, user_id, workflow_name, input, deadline_at FROM workflow_runs
         WHERE id = {run_id} AND status IN ('queued', 'in_progress')
           AND (deadline_at IS NULL OR deadline_at > now())
           FOR NO KEY UPDATE
    ), claimed AS (
        UPDATE stage_executions
           SET status = 'in_progress', claim_token = :token,
               started_at = COALESCE(started_at, now()),
               lease_expires_at = now() + make_interval(secs => :lease)
         WHERE run_id = (SELECT id FROM run) AND stage_id = {stage_id} AND {condition}
     RETURNING id, stage_id, stage_name, capability, dependencies, needs, input_template,
               config, attempt, agent_uuid, agent_attempts, tried_agents, error_message,
               errors, waits
    ), started AS (
        UPDATE workflow_runs SET status = 'in_progress', started_at = now(), updated_at = now()
         WHERE id = (SELECT id FROM run) AND status = 'queued' AND EXISTS (SELECT 1 FROM claimed)
    )
    SELECT claimed.*, run.id AS run_id, run.user_id AS owner_id, run.workflow_name,
           run.input AS workflow_input,
           EXTRACT(EPOCH FROM run.deadline_at - now()) AS deadline_in,
           (SELECT jsonb_object_agg(done.stage_id, done.output) FROM stage_executions AS done
             WHERE done.run_id = run.id AND done.status = 'completed'
               AND (claimed.needs IS NULL OR done.stage_id = ANY (claimed.needs))) AS outputs
      FROM {rows}
"""
_BY_PARAMETERS = {
    "candidate": "",
    "run_id": ":run_id",
    "stage_id": ":stage_id",
    "rows": "claimed, run",
}
_CLAIM = text(
    _CLAIM_SQL.format(
        **_BY_PARAMETERS,
        condition="status = 'queued' AND (not_before IS NULL OR not_before <= now())",
    )
)
_CLAIM_WAITING = text(_CLAIM_SQL.format(**_BY_PARAMETERS, condition="status = 'waiting'"))


class AssignResult(enum.Enum):
    ASSIGNED = "assigned"
    AGENT_INELIGIBLE = "agent-ineligible"  # deleted, offline, or no longer visible to the owner
    RUN_ENDED = "run-ended"  # the run failed (or was cancelled) meanwhile: call no agent
    CLAIM_LOST = "claim-lost"  # our lease expired and the stage moved on


def assign_agent(stage: ClaimedStage, agent_uuid: str, agent_id: str, attempt: int) -> AssignResult:
    """Record the agent chosen for `attempt`, before it is called, if Postgres (the source
    of truth, whatever a cache said) agrees it may serve the run: live, not offline, and
    the submitter's own or shared; and if the run is still live. FOR SHARE waits for a
    delete, health check or visibility change in flight, so once one has returned, no
    stage is assigned to the agent it excluded. A redelivery of this attempt then calls
    the same agent, with the same Idempotency-Key. The stage's wait for a slot, if it
    waited, ends here (a wait after a retry counts from its own start)."""
    row = _one_statement(
        _ASSIGN,
        {
            "id": stage.id,
            "token": stage.claim_token,
            "agent_uuid": uuid.UUID(agent_uuid),
            "agent_id": agent_id,
            "attempt": attempt,
        },
    )
    if not row.claimed:
        return AssignResult.CLAIM_LOST
    if not row.live:
        return AssignResult.RUN_ENDED
    return AssignResult.ASSIGNED if row.assigned else AssignResult.AGENT_INELIGIBLE


_ASSIGN = text(
    """
    WITH mine AS (
        SELECT s.id, s.run_id, r.user_id, r.status IN ('queued', 'in_progress') AS live
          FROM stage_executions AS s JOIN workflow_runs AS r ON r.id = s.run_id
         WHERE s.id = :id AND s.status = 'in_progress' AND s.claim_token = :token
    ), allowed AS (
        SELECT 1 FROM agents AS a, mine
         WHERE mine.live AND a.id = :agent_uuid AND a.deleted_at IS NULL
           AND a.status <> 'offline' AND (a.visibility = 'shared' OR a.owner_id = mine.user_id)
           FOR SHARE OF a
    ), assigned AS (
        UPDATE stage_executions
           SET agent_uuid = :agent_uuid, agent_id = :agent_id, attempt = :attempt,
               parked_at = NULL
         WHERE id IN (SELECT id FROM mine) AND EXISTS (SELECT 1 FROM allowed)
     RETURNING id
    )
    SELECT EXISTS (SELECT 1 FROM mine) AS claimed,
           COALESCE((SELECT live FROM mine), false) AS live,
           EXISTS (SELECT 1 FROM assigned) AS assigned
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
    """The workflow input and the outputs the stage needs (read with the claim; read
    again only for a stage claimed without them)."""
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
                "WHERE run_id = :run_id AND status = 'completed' "
                "AND (CAST(:needs AS text[]) IS NULL OR stage_id = ANY (CAST(:needs AS text[])))"
            ),
            {"run_id": stage.run_id, "needs": stage.needs},
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
    output_bytes: int = 0
    overdue: bool = False  # past its deadline (workflow.timeoutMs)

    @property
    def live(self) -> bool:
        return self.status in LIVE_RUN_STATUSES


LIVE_RUN_STATUSES = ("queued", "in_progress")

# Set with a run's end, in the same UPDATE: its completion callback (if any) is now due.
CALLBACK_DUE = (
    "callback_state = CASE WHEN callback_url IS NOT NULL THEN 'pending' END, "
    "callback_next_at = now(), callback_attempts = 0, callback_error = NULL, "
    "callback_delivery = gen_random_uuid()"
)


def ended_stage_status(run_status: str) -> str:
    """What a stage that can no longer run becomes: cancelled with its run, else skipped."""
    return "cancelled" if run_status == "cancelled" else "skipped"


def lock_run(session: Session, run_id: uuid.UUID) -> LockedRun:
    """Take the run's row lock (only its status, output total and whether its deadline has
    passed are read: not the definition or input)."""
    row = session.execute(
        text(
            "SELECT status, output_bytes, COALESCE(deadline_at <= now(), false) AS overdue "
            "FROM workflow_runs WHERE id = :run_id FOR UPDATE"
        ),
        {"run_id": run_id},
    ).first()
    assert row is not None, f"run {run_id} vanished"
    return LockedRun(run_id, row.status, row.output_bytes, row.overdue)


class RunOutputTooLarge(Exception):
    """Storing the stage's input and output would take the run past
    MAOF_RUN_MAX_OUTPUT_BYTES."""


@dataclass(frozen=True)
class Completed:
    """What a completion made of the dependents that became ready."""

    send: list[str] = field(default_factory=list)  # queued: their messages to be sent
    # Waiting for a slot, no message: (stage id, capability).
    parked: list[tuple[str, str]] = field(default_factory=list)
    # "completed"; "discarded": the run had ended, the answer was not kept; "lost": the
    # claim was no longer ours (our lease expired and the stage moved on): nothing written.
    outcome: str = "completed"


def complete_stage(
    stage: ClaimedStage,
    agent_uuid: str,
    agent_id: str,
    stage_input: Any,
    output: Any,
    output_json: str | None = None,
    full: Callable[[str], str | None] | None = None,
) -> Completed:
    """Store the output, audit it, queue the dependents that became ready, and finish
    the run when every stage is done. `output_json` is the output already serialised
    (dispatch checked it), if at hand. A ready dependent whose capability is `full`
    (every agent with it at capacity: `full` says why, else None) waits for a slot
    straight away, as park_stage would have it wait once its message came round (no
    message, no claim). Raises RunOutputTooLarge, having written nothing, when the run's
    total of stored stage inputs and outputs would pass its cap. A run past its deadline
    is failed here, as the sweeper would fail it, and the answer discarded: the claim
    refused it, so must its answer.

    Under the run's lock, in as few round trips as Postgres allows: the stage's update
    also reads the head of the audit chain; the audit entry's insert also queues the
    ready dependents and counts the stages still open."""
    stored = output_json if output_json is not None else _json(output)
    stored_input = _json(stage_input)
    # The input is stored (and answered by GET /workflows/{id}) as the output is: one
    # workflow input referenced by many stages must not grow the run past its cap. Both
    # are counted as the deployed API answers them (served_size): the cap is what keeps
    # the run's detail within what a Lambda function can return.
    size = sum(served_size(value) for value in (stored, stored_input) if value)
    with session_scope() as session:
        run = end_if_overdue(session, lock_run(session, stage.run_id))
        if not run.live:
            discarded = _discard(session, stage, run, agent_id, output)
            return Completed(outcome="discarded" if discarded else "lost")
        if run.output_bytes + size > get_settings().run_max_output_bytes:
            raise RunOutputTooLarge(
                f"the run's stored input and stage inputs and outputs would exceed "
                f"MAOF_RUN_MAX_OUTPUT_BYTES "
                f"({get_settings().run_max_output_bytes} bytes, as served)"
            )
        updated = session.execute(
            _COMPLETE,
            {
                "id": stage.id,
                "run_id": stage.run_id,
                "token": stage.claim_token,
                "output": stored,
                "bytes": size,
                "input": stored_input,
                "agent_uuid": uuid.UUID(agent_uuid),
                "agent_id": agent_id,
            },
        ).first()
        if updated is None:
            return Completed(outcome="lost")  # our lease expired, the stage moved on
        duration_ms = int((updated.completed_at - updated.started_at).total_seconds() * 1000)
        entry = chain.next_entry(
            stage.run_id,
            updated.last_seq,
            updated.last_hash,
            "execute",
            "completed",
            stage_id=stage.stage_id,
            agent_id=agent_id,
            input_hash=chain.value_hash(stage_input),
            output_hash=chain.value_hash(output),
            details={"attempt": stage.attempt, "durationMs": duration_ms},
        )
        advanced = session.execute(
            _APPEND_AND_ADVANCE, {**audit_rows.params(entry), "run_id": stage.run_id}
        ).one()
        ready: dict[str, str] = dict(advanced.ready or {})  # stage id -> capability
        if not ready and advanced.still_open == 0:
            finish_run(session, run, entry)
        reasons = (
            {capability: full(capability) for capability in set(ready.values())} if full else {}
        )
        waiting = {s: reason for s, cap in ready.items() if (reason := reasons.get(cap))}
        parked = _park_ready(session, stage.run_id, entry, waiting) if waiting else []
        return Completed([s for s in ready if s not in parked], [(s, ready[s]) for s in parked])


def _park_ready(
    session: Session, run_id: uuid.UUID, head: AuditEntry, reasons: dict[str, str]
) -> list[str]:
    """Queued stages of the run (under its lock, `head` the chain's last entry) made to
    wait for a slot, each with its one `wait` entry (`reasons`: why, by stage id);
    returns those that were."""
    rows = session.execute(_PARK_QUEUED, {"run_id": run_id, "stage_ids": list(reasons)}).all()
    entries = []
    for row in sorted(rows, key=lambda r: str(r.stage_id)):
        head = chain.next_entry(
            run_id,
            head.seq,
            head.entry_hash,
            "wait",
            "waiting",
            stage_id=row.stage_id,
            details={"reason": reasons[row.stage_id], "attempt": row.attempt},
        )
        entries.append(audit_rows.params(head))
    if entries:
        session.execute(audit_rows.INSERT, entries)
    return [row.stage_id for row in rows]


_PARK_QUEUED = text(
    """
    UPDATE stage_executions
       SET status = 'waiting', parked_at = now(), queued_at = now(), waits = waits + 1
     WHERE run_id = :run_id AND stage_id = ANY (:stage_ids) AND status = 'queued'
 RETURNING stage_id, attempt
    """
)


def _discard(
    session: Session,
    stage: ClaimedStage,
    run: LockedRun,
    agent_id: str,
    output: Any = None,
    error: str | None = None,
) -> bool:
    """The agent answered after the run ended: its output (or, `error` given, the error
    it answered with) is not kept (nothing follows a run's end), the stage ends with the
    run, and the audit trail says what came back. False if the stage was no longer ours."""
    status = ended_stage_status(run.status)
    discarded = session.execute(
        text(
            "UPDATE stage_executions SET status = :status, agent_id = :agent_id, "
            "completed_at = now(), lease_expires_at = NULL, claim_token = NULL "
            "WHERE id = :id AND status = 'in_progress' AND claim_token = :token RETURNING id"
        ),
        {"id": stage.id, "token": stage.claim_token, "status": status, "agent_id": agent_id},
    ).first()
    if discarded is not None:
        details: dict[str, Any] = {"reason": f"the agent answered after the run was {run.status}"}
        answer: dict[str, Any] = {"output": output}  # hashed into the entry
        if error is not None:
            details["error"], answer = error, {}  # an error answer has no output to hash
        chain.append(
            session,
            stage.run_id,
            "discard",
            status,
            stage_id=stage.stage_id,
            agent_id=agent_id,
            details=details,
            **answer,
        )
    return discarded is not None


# An answer that ends the stage (its output, or its failure) is kept while the claim is
# ours: in progress, or queued again by the sweeper after our lease ran out (it keeps the
# token) and not claimed by another worker yet (a claim replaces the token). The lease
# expiry it counted is moot: the stage has ended, and a retry of the run resets counters.
_ENDS_OUR_CLAIM = "id = :id AND status IN ('in_progress', 'queued') AND claim_token = :token"

# The stage's completion, conditional on our claim, and the head of the run's audit chain
# (read after the run lock was taken, so no other entry can follow it meanwhile).
_COMPLETE = text(
    f"""
    WITH done AS (
        UPDATE stage_executions
           SET status = 'completed', output = CAST(:output AS jsonb),
               input = CAST(:input AS jsonb), agent_uuid = :agent_uuid,
               agent_id = :agent_id, completed_at = now(), lease_expires_at = NULL
         WHERE {_ENDS_OUR_CLAIM}
     RETURNING started_at, completed_at
    ), counted AS (
        UPDATE workflow_runs SET output_bytes = output_bytes + :bytes
         WHERE id = :run_id AND EXISTS (SELECT 1 FROM done)
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
 RETURNING s.stage_id, s.capability
"""

# The audit entry, the ready dependents, and how many stages are not completed yet.
_APPEND_AND_ADVANCE = text(
    f"""
    WITH entry AS (INSERT INTO execution_logs ({audit_rows.COLUMNS}) VALUES ({audit_rows.VALUES})),
         ready AS ({_READY})
    SELECT (SELECT jsonb_object_agg(stage_id, capability) FROM ready) AS ready,
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
        output_hash=chain.value_hash(output),
    )
    session.execute(
        text(
            f"WITH entry AS (INSERT INTO execution_logs ({audit_rows.COLUMNS}) "
            f"VALUES ({audit_rows.VALUES})) "
            f"UPDATE workflow_runs SET status = 'completed', {CALLBACK_DUE}, "
            "output = CAST(:output AS jsonb), "
            "completed_at = now(), updated_at = now() WHERE id = :run_id"
        ),
        {**audit_rows.params(entry), "run_id": run.id, "output": _json(output)},
    )


def fail_stage(
    stage: ClaimedStage, reason: str, agent_id: str | None = None, stage_input: Any = None
) -> str:
    """Fail the stage and its run; stages not yet started are skipped: "failed". If the
    run has ended meanwhile (cancelled, failed, past its deadline), the stage ends with it
    instead, as for a late success answer: an error its agent (`agent_id`) answered is
    discarded ("discarded"), any other reason skips it ("skipped"). "lost" if the stage
    was no longer ours. Its resolved input is stored, and counted, while the run stays
    within MAOF_RUN_MAX_OUTPUT_BYTES; past it (the input is what would not fit) none is."""
    stored_input = _json(stage_input)
    input_bytes = served_size(stored_input) if stored_input else 0
    with session_scope() as session:
        run = end_if_overdue(session, lock_run(session, stage.run_id))
        if not run.live:
            if agent_id is not None:
                discarded = _discard(session, stage, run, agent_id, error=reason)
                return "discarded" if discarded else "lost"
            return str(_skip_ended(session, stage, run).value)
        if run.output_bytes + input_bytes > get_settings().run_max_output_bytes:
            stored_input, input_bytes = None, 0
        updated = session.execute(
            _FAIL,
            {
                "id": stage.id,
                "run_id": stage.run_id,
                "token": stage.claim_token,
                "reason": reason,
                "agent_id": agent_id,
                "input": stored_input,
                "bytes": input_bytes,
            },
        ).first()
        if updated is None:
            return "lost"
        record_failure(
            session, run, stage.stage_id, stage.stage_name, reason, agent_id, stage.attempt
        )
    return "failed"


# The stage's failure, conditional on our claim; its input counted in the run's total.
_FAIL = text(
    f"""
    WITH failed AS (
        UPDATE stage_executions
           SET status = 'failed', error_message = :reason, agent_id = :agent_id,
               input = CAST(:input AS jsonb), completed_at = now(), lease_expires_at = NULL
         WHERE {_ENDS_OUR_CLAIM}
     RETURNING id
    ), counted AS (
        UPDATE workflow_runs SET output_bytes = output_bytes + :bytes
         WHERE id = :run_id AND EXISTS (SELECT 1 FROM failed)
    )
    SELECT id FROM failed
    """
)


def record_failure(
    session: Session,
    run: LockedRun,
    stage_id: str,
    stage_name: str,
    reason: str,
    agent_id: str | None,
    attempt: int,
) -> None:
    """After a stage row was set failed, under the run's lock: audit it, skip what has not
    started, and fail the run (if it is still live)."""
    chain.append(
        session,
        run.id,
        "fail",
        "failed",
        stage_id=stage_id,
        agent_id=agent_id,
        details={"attempt": attempt, "error": reason},
    )
    if not run.live:
        return
    skipped = session.execute(
        text(
            "UPDATE stage_executions SET status = 'skipped', completed_at = now() "
            "WHERE run_id = :run_id AND status IN ('pending', 'queued', 'waiting') "
            "RETURNING stage_id, position"
        ),
        {"run_id": run.id},
    ).all()
    for row in sorted(skipped, key=lambda r: r.position):
        chain.append(
            session,
            run.id,
            "skip",
            "skipped",
            stage_id=row.stage_id,
            details={"reason": f"stage '{stage_id}' failed"},
        )
    message = f"Stage '{stage_id}' ({stage_name}) failed: {reason}"
    session.execute(
        text(
            f"UPDATE workflow_runs SET status = 'failed', {CALLBACK_DUE}, error_message = :message, "
            "completed_at = now(), updated_at = now() WHERE id = :run_id"
        ),
        {"run_id": run.id, "message": message},
    )


def _json(value: Any) -> str | None:
    return None if value is None else dumps(value)


def release_stage(stage: ClaimedStage, due_in: float = 0) -> None:
    """Hand a claimed stage back to the queue, same attempt, after an error of the
    infrastructure (the database or the queue failed us: the stage is not to blame), due
    in `due_in` seconds: when its message, handed back to SQS, is visible again (in flight
    meanwhile, it is in no queue depth; not due, the sweeper leaves it alone rather than
    re-send it as lost). Best effort: when even this fails, the lease runs out and the
    sweeper hands it on."""
    with session_scope() as session:
        session.execute(
            text(
                "UPDATE stage_executions SET status = 'queued', queued_at = now(), "
                "not_before = GREATEST(not_before, now() + make_interval(secs => :due_in)), "
                "lease_expires_at = NULL, claim_token = NULL "
                "WHERE id = :id AND status = 'in_progress' AND claim_token = :token"
            ),
            {"id": stage.id, "token": stage.claim_token, "due_in": due_in},
        )


def wake_stage(run_id: uuid.UUID, stage_id: str) -> bool:
    """Queue a waiting stage again (its message to be sent by the caller)."""
    with autocommit_connection() as conn:
        woken = conn.execute(
            text(
                "UPDATE stage_executions SET status = 'queued', queued_at = now() "
                "WHERE run_id = :run_id AND stage_id = :stage_id AND status = 'waiting' "
                "RETURNING id"
            ),
            {"run_id": run_id, "stage_id": stage_id},
        ).first()
    return woken is not None


class Requeued(enum.Enum):
    QUEUED = "queued"  # due again after the delay: send its message
    SKIPPED = "skipped"  # the run ended meanwhile: the stage will not run again
    DISCARDED = "discarded"  # the same, and what its agent's call ended with is discarded
    LOST = "lost"  # no longer ours (lease expired)


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
    errors: int | None = None,
    waits: int | None = None,
    keep_agent: bool = False,
) -> Requeued:
    """Put the stage back in the queue, due in `delay_ms`, with an audit entry `action`
    (retry, fallback or wait) and its counters (`keep_agent`: leave the agent recorded on
    the stage as it is); or, when its run has ended meanwhile, end the stage with it (no
    agent is called for an ended run): the error its agent's call ended with (`agent_id`
    given) is discarded, as fail_stage discards a final one; otherwise it is skipped."""
    with session_scope() as session:
        run = lock_run(session, stage.run_id)
        if not run.live:
            if agent_id is None:
                return _skip_ended(session, stage, run)
            discarded = _discard(session, stage, run, agent_id, error=details.get("error"))
            return Requeued.DISCARDED if discarded else Requeued.LOST
        updated = session.execute(
            text(
                """
                UPDATE stage_executions
                   SET status = 'queued', queued_at = now(), lease_expires_at = NULL,
                       claim_token = NULL,
                       not_before = now() + make_interval(secs => :delay_ms / 1000.0),
                       attempt = attempt + :bump,
                       agent_uuid = CASE WHEN :keep_agent THEN agent_uuid ELSE :agent_uuid END,
                       agent_id = CASE WHEN :keep_agent THEN agent_id ELSE :agent_id END,
                       agent_attempts = :agent_attempts, tried_agents = :tried_agents,
                       error_message = :error, errors = COALESCE(:errors, errors),
                       waits = COALESCE(:waits, waits)
                 WHERE id = :id AND status = 'in_progress' AND claim_token = :token
             RETURNING attempt
                """
            ),
            {
                "id": stage.id,
                "token": stage.claim_token,
                "delay_ms": delay_ms,
                "bump": 1 if next_attempt else 0,
                "keep_agent": keep_agent,
                "agent_uuid": agent_uuid,
                "agent_id": agent_id,
                "agent_attempts": agent_attempts,
                "tried_agents": tried_agents,
                "error": details.get("error"),
                "errors": errors,
                "waits": waits,
            },
        ).first()
        if updated is None:
            return Requeued.LOST
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
    return Requeued.QUEUED


def skip_if_run_ended(stage: ClaimedStage) -> bool:
    """Skip the claimed stage if its run has ended (failed, cancelled) since the claim."""
    with session_scope() as session:
        run = lock_run(session, stage.run_id)
        if run.live:
            return False
        _skip_ended(session, stage, run)
    return True


def _skip_ended(session: Session, stage: ClaimedStage, run: LockedRun) -> Requeued:
    status = ended_stage_status(run.status)
    skipped = session.execute(
        text(
            "UPDATE stage_executions SET status = :status, completed_at = now(), "
            "lease_expires_at = NULL, claim_token = NULL "
            "WHERE id = :id AND status = 'in_progress' AND claim_token = :token RETURNING id"
        ),
        {"id": stage.id, "token": stage.claim_token, "status": status},
    ).first()
    if skipped is None:
        return Requeued.LOST
    chain.append(
        session,
        stage.run_id,
        "skip",
        status,
        stage_id=stage.stage_id,
        details={"reason": f"the run is {run.status}"},
    )
    return Requeued.SKIPPED


def renew_leases(claim_tokens: list[uuid.UUID]) -> int:
    """Extend the leases of stages this worker still holds; how many it renewed.

    A stage whose row another transaction holds right now (its own completion, mostly) is
    skipped, not waited for: waiting, the renewal held the rows it had already updated,
    and every completion of those stages queued behind it (100 ms at a time under load).
    The next renewal, a few seconds on and well within the lease, takes it."""
    if not claim_tokens:
        return 0
    with autocommit_connection() as conn:
        return len(
            conn.execute(
                _RENEW, {"lease": get_settings().stage_lease_seconds, "tokens": claim_tokens}
            ).all()
        )


_RENEW = text(
    """
    UPDATE stage_executions SET lease_expires_at = now() + make_interval(secs => :lease)
     WHERE id IN (SELECT id FROM stage_executions
                   WHERE claim_token = ANY (:tokens) AND status = 'in_progress'
                     FOR UPDATE SKIP LOCKED)
 RETURNING id
    """
)


def park_stage(stage: ClaimedStage, reason: str) -> Requeued:
    """Every agent that could take the stage is full: it waits in Postgres (status
    `waiting`, in line by when it first began to wait) without a message, until a worker
    that frees a slot hands it over (or the sweeper wakes it). Only its first wait is an
    audit entry. Skipped instead if its run has ended."""
    with session_scope() as session:
        run = lock_run(session, stage.run_id)
        if not run.live:
            return _skip_ended(session, stage, run)
        parked = session.execute(
            _PARK, {"id": stage.id, "run_id": stage.run_id, "token": stage.claim_token}
        ).first()
        if parked is None:
            return Requeued.LOST
        if parked.waits == 1:
            entry = chain.next_entry(
                stage.run_id,
                parked.last_seq,
                parked.last_hash,
                "wait",
                "waiting",
                stage_id=stage.stage_id,
                details={"reason": reason, "attempt": stage.attempt},
            )
            session.execute(audit_rows.INSERT, audit_rows.params(entry))
    return Requeued.QUEUED


# The stage's parking, conditional on our claim, and the head of the run's audit chain
# (read after the run lock was taken, as in _COMPLETE).
_PARK = text(
    """
    WITH parked AS (
        UPDATE stage_executions
           SET status = 'waiting', parked_at = COALESCE(parked_at, now()),
               queued_at = now(), lease_expires_at = NULL, claim_token = NULL,
               waits = waits + 1
         WHERE id = :id AND status = 'in_progress' AND claim_token = :token
     RETURNING waits
    )
    SELECT parked.waits, head.seq AS last_seq, head.entry_hash AS last_hash
      FROM parked LEFT JOIN LATERAL (
           SELECT seq, entry_hash FROM execution_logs
            WHERE run_id = :run_id ORDER BY seq DESC LIMIT 1) AS head ON true
    """
)


def next_waiting(
    agent_uuid: str, limit: int = 3, releasing: uuid.UUID | None = None
) -> list[tuple[uuid.UUID, str]]:
    """The waiting stages this agent may take, best first (run id, stage id).

    Fair across users, then runs: each run competes with its head (its stage that first
    began to wait); first the heads of the users with the fewest stages in progress on
    this agent, then of the runs with the fewest stages in progress (on any agent), then
    the one that first began to wait. A stage of a user holding fewer of the agent's slots
    goes before every stage of a user holding more, however many that one has waiting.
    `releasing`: the claim of the stage whose call just gave the slot up, counted for no
    one (still in progress as it hands the slot on, it tipped the choice to the others)."""
    with autocommit_connection() as conn:
        params = {"agent_uuid": uuid.UUID(agent_uuid), "limit": limit, "releasing": releasing}
        rows = conn.execute(_NEXT_WAITING, params)
        return [(row.run_id, row.stage_id) for row in rows]


# An agent the health check marked offline is handed no stage (its slots freed by calls
# already running go back unused); its waiting stages wait for another agent, or the
# sweeper wakes them to fail for want of one.
# A stage kept for its agent (a retry goes back to the agent that failed it) waits for that
# agent only while it may still serve the run: deleted, offline or unshared, it no longer
# holds the stage back from the others (which then call it under a new attempt).
# A release reads about one index entry per run waiting for the agent's capabilities, not
# every waiting stage (one user may have 50,000): the runs are found one probe each of the
# stage_executions_waiting_runs index (a skip scan: waiting_runs), each run's head by a
# walk of that index from its first stage in line, and each head's run counts its stages
# in progress by stage_executions_in_progress_runs. Behind one user's 25,000 waiting
# stages (250 runs) it took 150 ms, reading and sorting every one; 10 ms now. The agent's
# row is read once, not once per waiting stage, and so are its stages in progress, counted
# by user (about its slots' worth of rows, by the stage_executions_on_agent index).
_NEXT_WAITING_SQL = """
    WITH RECURSIVE agent AS MATERIALIZED (
        SELECT id, owner_id, visibility, capabilities FROM agents
         WHERE id = :agent_uuid AND deleted_at IS NULL AND status <> 'offline'
    ), holders AS MATERIALIZED (
        SELECT r.user_id, count(*) AS stages
          FROM stage_executions AS x JOIN workflow_runs AS r ON r.id = x.run_id, agent AS a
         WHERE x.agent_uuid = a.id AND x.status = 'in_progress'
           AND x.claim_token IS DISTINCT FROM CAST(:releasing AS uuid)
         GROUP BY r.user_id
    ), waiting_runs (capability, run_id) AS (
        SELECT c.capability, first.run_id
          FROM agent AS a, unnest(a.capabilities) AS c (capability),
               LATERAL (SELECT run_id FROM stage_executions
                         WHERE status = 'waiting' AND capability = c.capability
                         ORDER BY run_id LIMIT 1) AS first
        UNION ALL
        SELECT w.capability, next.run_id FROM waiting_runs AS w,
               LATERAL (SELECT run_id FROM stage_executions
                         WHERE status = 'waiting' AND capability = w.capability
                           AND run_id > w.run_id
                         ORDER BY run_id LIMIT 1) AS next
    ), heads AS (
        SELECT DISTINCT ON (r.id) r.id AS run_id, s.stage_id, s.parked_at, r.user_id
          FROM waiting_runs AS w JOIN workflow_runs AS r ON r.id = w.run_id, agent AS a,
               LATERAL (SELECT s.id, s.stage_id, s.parked_at FROM stage_executions AS s
                         WHERE s.status = 'waiting' AND s.capability = w.capability
                           AND s.run_id = w.run_id AND NOT (a.id = ANY (s.tried_agents))
                           AND (s.agent_uuid IS NULL OR s.agent_uuid = a.id OR NOT EXISTS (
                                SELECT 1 FROM agents AS p
                                 WHERE p.id = s.agent_uuid AND p.deleted_at IS NULL
                                   AND p.status <> 'offline'
                                   AND (p.visibility = 'shared' OR p.owner_id = r.user_id)))
                         ORDER BY s.parked_at, s.id LIMIT 1) AS s
         WHERE r.status IN ('queued', 'in_progress')
           AND (r.deadline_at IS NULL OR r.deadline_at > now())
           AND (a.visibility = 'shared' OR r.user_id = a.owner_id)
         ORDER BY r.id, s.parked_at, s.id
    )
    SELECT heads.run_id, heads.stage_id FROM heads LEFT JOIN holders USING (user_id)
     ORDER BY COALESCE(holders.stages, 0),
              (SELECT count(*) FROM stage_executions AS x
                WHERE x.run_id = heads.run_id AND x.status = 'in_progress'
                  AND x.claim_token IS DISTINCT FROM CAST(:releasing AS uuid)),
              heads.parked_at
     LIMIT {limit}
"""
_NEXT_WAITING = text(_NEXT_WAITING_SQL.format(limit=":limit"))
_CLAIM_NEXT_WAITING = text(
    _CLAIM_SQL.format(
        candidate=f"candidate AS MATERIALIZED ({_NEXT_WAITING_SQL.format(limit=1)}),",
        run_id="(SELECT run_id FROM candidate)",
        stage_id="(SELECT stage_id FROM candidate)",
        condition="status = 'waiting'",
        rows="candidate LEFT JOIN (claimed CROSS JOIN run) ON true",
    )
)


def end_run(
    session: Session,
    run: LockedRun,
    status: str,
    message: str | None,
    action: str,
    details: dict[str, Any],
) -> list[str]:
    """Under the run's lock: end a live run for a reason of its own (a cancel, its
    deadline). Stages not started end with it (`cancelled`, or `skipped`); those in
    progress finish on their own and what their agents answer is discarded (complete_stage).
    One audit entry `action` names them. Returns the stages ended."""
    stage_status = ended_stage_status(status)
    ended = [
        row.stage_id
        for row in session.execute(
            text(
                "UPDATE stage_executions SET status = :status, completed_at = now(), "
                "parked_at = NULL WHERE run_id = :run_id "
                "AND status IN ('pending', 'queued', 'waiting') RETURNING stage_id"
            ),
            {"run_id": run.id, "status": stage_status},
        )
    ]
    chain.append(session, run.id, action, status, details={**details, "stagesEnded": ended})
    session.execute(
        text(
            f"UPDATE workflow_runs SET status = :status, {CALLBACK_DUE}, "
            "error_message = :message, completed_at = now(), updated_at = now() "
            "WHERE id = :run_id"
        ),
        {"run_id": run.id, "status": status, "message": message},
    )
    return ended


def expire_run(run_id: uuid.UUID) -> bool:
    """Fail a live run whose deadline has passed; False if it had ended or is not due."""
    with session_scope() as session:
        run = lock_run(session, run_id)
        return run.live and not end_if_overdue(session, run).live


def end_if_overdue(session: Session, run: LockedRun) -> LockedRun:
    """Under the run's lock: a live run past its deadline is failed (its `deadline` entry,
    its callback due), whoever notices first, the sweeper or a stage's answer (which its
    caller then discards, as after any end). Returns the run as it now stands."""
    if not (run.live and run.overdue):
        return run
    timeout_ms = session.execute(
        text("SELECT (definition ->> 'timeoutMs')::bigint FROM workflow_runs WHERE id = :run_id"),
        {"run_id": run.id},
    ).scalar()
    message = f"deadline of {timeout_ms} ms exceeded"
    end_run(session, run, "failed", message, "deadline", {"timeoutMs": timeout_ms})
    return LockedRun(run.id, "failed", run.output_bytes)
