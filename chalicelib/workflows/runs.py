"""Submit a workflow run, and read runs, their results and their audit trail."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Connection, case, func, select, text, true
from sqlalchemy.orm import Session, aliased

from chalicelib import limits, observability
from chalicelib.agents.secrets import encrypt_token
from chalicelib.agents.selection import waiting_reason
from chalicelib.audit import chain
from chalicelib.audit import rows as audit_rows
from chalicelib.config import get_settings
from chalicelib.core import errors, responses
from chalicelib.core.api import PageQuery, Principal, Reply, page_meta, parse_run_ref, run_ref
from chalicelib.core.encoding import dumps, served_size
from chalicelib.db import autocommit_connection, session_scope
from chalicelib.db.models import SUBMISSION_KEY_DAYS, AuditEntry, StageExecution, WorkflowRun
from chalicelib.engine.queue import send_stage_messages
from chalicelib.engine.stages import wake_stage
from chalicelib.logs import logger
from chalicelib.workflows.definition import (
    ExecuteRequest,
    check_dag,
    check_input_sizes,
    check_timeouts,
    needed_outputs,
)


class RunQuery(PageQuery):
    status: Literal["queued", "in_progress", "completed", "failed", "cancelled"] | None = None


IDEMPOTENCY_KEY_MAX = 255


def idempotency_key(header: str | None) -> str | None:
    """The Idempotency-Key header's value, checked: 1 to 255 printable characters."""
    if header is None:
        return None
    if not 0 < len(header) <= IDEMPOTENCY_KEY_MAX or not header.isprintable():
        raise errors.ValidationError(
            "Idempotency-Key must be 1 to 255 printable characters",
            [{"field": "Idempotency-Key", "message": "1 to 255 printable characters"}],
        )
    return header


@contextmanager
def admitted(principal: Principal, key_header: str | None) -> Iterator[None]:
    """Around reading a submission's body (parsing and validating a large one costs
    seconds of CPU): if one more submission would be past MAOF_SUBMISSIONS_PER_MINUTE,
    a 429 before the body is read (counted, as every refused one is), unless the
    Idempotency-Key (`key_header`) is live: a resend gets its run back (submit compares
    the bodies), uncounted. A body refused is counted, as submit counts each definition
    it refuses; one accepted is counted by submit, once it has looked for the key's run
    (so that neither a resend nor a duplicate racing it is counted). Requests sent at
    once are all checked before any is counted: a burst past the rate has at most as many
    bodies read as it has requests in flight."""
    user = str(principal.user_uuid)
    try:
        key = idempotency_key(key_header)
    except errors.ApiError as refused:
        if refused.status < 500:  # refused for what it is, not for this service's state
            limits.count_refused_submission(user)
        raise
    if limits.submissions_wait(user) and (key is None or not _key_is_live(principal, key)):
        raise limits.count_refused_submission(user)
    try:
        yield
    except errors.ApiError as refused:
        if refused.status < 500:  # refused for what it is, not for this service's state
            limits.count_refused_submission(user)
        raise


def _key_is_live(principal: Principal, key: str) -> bool:
    """Whether the user's Idempotency-Key `key` made a run less than KEY_DAYS ago; once a
    submission holding the key (hold_key) has committed or failed: the one that took the
    rate's last place may still be storing its run."""
    with session_scope() as session:
        hold_key(session, principal.user_uuid, key)
        return bool(
            session.execute(
                text(
                    "SELECT EXISTS (SELECT 1 FROM submission_keys WHERE user_id = :user_id "
                    f"AND key = :key AND created_at >= {_KEY_CUTOFF})"
                ),
                {"user_id": principal.user_uuid, "key": key},
            ).scalar_one()
        )


def _counted_input(stored_input: str) -> int:
    """The workflow input's share of MAOF_RUN_MAX_OUTPUT_BYTES: the run's detail answers
    it with the stages' inputs and outputs, so it counts as they do (as served). 400 when
    it alone passes the cap: no stage of the run could complete."""
    size = served_size(stored_input)
    cap = get_settings().run_max_output_bytes
    if size > cap:
        message = (
            f"The workflow input is {size} bytes as served, over MAOF_RUN_MAX_OUTPUT_BYTES "
            f"({cap} bytes): the run's input and stored stage inputs and outputs"
        )
        raise errors.ValidationError(message, [{"field": "input", "message": message}])
    return size


def submit(principal: Principal, body: ExecuteRequest, key: str | None = None) -> Reply:
    """Store the run, its stages and the first audit entry in one statement (one round
    trip, one transaction), then queue the stages with no dependencies. If sending fails,
    the sweeper sends them later: the run is accepted.

    Limited per user: MAOF_SUBMISSIONS_PER_MINUTE, a submission refused for its
    definition counted too (checking one costs CPU), and at most MAOF_MAX_ACTIVE_RUNS runs
    queued or in progress (counted by the insert itself, so no extra round trip).

    With an Idempotency-Key (`key`, per user, kept 24 h) the same statement claims the
    key: a second submission with the key stores nothing and gets the first run, or a 409
    if its body differs. A key older than 24 h is forgotten: the submission is a new one
    (quota and all). A resent submission whose key is live is answered before the rate is
    counted: it stores nothing, and a client resending after a timeout must get its run
    back, not a 429. So is a duplicate racing the first: it waits for the first to commit or
    fail (hold_key), then looks for its run.
    Nothing costly is done before the rate is counted but what a key needs: the body's
    hash (most of a second for a large body) only with one."""
    body_hash = None
    live_since = datetime.now(UTC) - timedelta(days=KEY_DAYS)
    if key is not None:
        body_hash = chain.sha256_json(body.model_dump(by_alias=True, mode="json"))
        with autocommit_connection() as conn:  # a resend's answer: one round trip, no lock
            earlier = _earlier_submission(conn, principal, key, body_hash, live_since)
        if earlier is not None:
            return earlier
    # The session takes a connection at its first statement: an unkeyed submission holds
    # none while it is counted and checked. Whatever is read once a key is held is read in
    # it: submissions each holding a connection and waiting for a second could use up the
    # pool (the local server's, shared by its threads) and stall one another.
    with session_scope() as session:
        if key is not None and body_hash is not None:
            hold_key(session, principal.user_uuid, key)
            earlier = _earlier_submission(session, principal, key, body_hash, live_since)
            if earlier is not None:
                return earlier
        limits.limit_submissions(str(principal.user_uuid))
        check_dag(body.workflow)
        check_timeouts(body.workflow)
        check_input_sizes(body.workflow, body.input)
        stored_input = dumps(body.input)
        input_bytes = _counted_input(stored_input)
        run_id = uuid.uuid4()
        stages = body.workflow.stages
        # A first stage whose every agent is full waits for a slot from the start (as it
        # would once its message came round, found them full and parked it).
        first = [stage for stage in stages if not stage.dependencies]
        owner = principal.user_uuid
        capabilities = {stage.agent_capability for stage in first}
        reasons = {c: waiting_reason(c, owner, session) for c in capabilities}
        full = {capability: reason for capability, reason in reasons.items() if reason}
        waiting = [stage for stage in first if stage.agent_capability in full]
        roots = [stage.id for stage in first if stage.agent_capability not in full]
        rows = [
            {
                "stage_id": stage.id,
                "stage_name": stage.name,
                "position": position,
                "capability": stage.agent_capability,
                "dependencies": stage.dependencies,
                "needs": needed_outputs(stage),
                # JSON texts: a None is stored as JSON null, as the ORM stores it.
                "input_template": dumps(stage.input),
                "config": dumps(
                    stage.config.model_dump(by_alias=True, exclude_none=True)
                    if stage.config
                    else None
                ),
                "ready": not stage.dependencies,
                "waiting": not stage.dependencies and stage.agent_capability in full,
            }
            for position, stage in enumerate(stages)
        ]
        # A new run's chain starts at GENESIS: no head to read.
        entry = chain.next_entry(
            run_id,
            None,
            None,
            "submit",
            "queued",
            input_hash=chain.value_hash(body.input),
            details={"workflowName": body.workflow.name, "stages": len(stages)},
        )
        waits: list[AuditEntry] = []
        for stage in waiting:  # each waiting stage's one `wait` entry
            last = waits[-1] if waits else entry
            details = {"reason": full[stage.agent_capability], "attempt": 1}
            waits.append(
                chain.next_entry(
                    run_id,
                    last.seq,
                    last.entry_hash,
                    "wait",
                    "waiting",
                    stage_id=stage.id,
                    details=details,
                )
            )
        max_active = get_settings().max_active_runs
        callback = body.callback
        hold_quota(session, principal.user_uuid)
        stored = session.execute(
            _SUBMIT,
            {
                "max_active": max_active,
                "run_id": run_id,
                "user_id": principal.user_uuid,
                "key": key,
                "body_hash": body_hash,
                "workflow_name": body.workflow.name,
                "definition": dumps(body.workflow.model_dump(by_alias=True, mode="json")),
                "input": stored_input,
                "input_bytes": input_bytes,
                "timeout_ms": body.workflow.timeout_ms,
                "callback_url": callback.url if callback else None,
                "callback_secret": encrypt_token(callback.secret) if callback else None,
                "stages": dumps(rows),
                **audit_rows.params(entry),
                "entries": audit_rows.records_json(waits),
            },
        ).one()
    if key is not None and not stored.keyed:
        with autocommit_connection() as conn:
            earlier = _earlier_submission(conn, principal, key, stored.body_hash, stored.key_cutoff)
        if earlier is not None:
            return earlier
        # The key was free or had expired, and still not claimed: the only reason is the
        # quota (nothing was stored), so it is answered as any submission over the quota.
    if not stored.stored:
        raise over_quota(max_active)
    try:
        send_stage_messages(run_id, roots, fast=True)
    except Exception:
        logger.exception(
            "could not queue a new run; the sweeper will", extra={"runId": str(run_id)}
        )
    first_of: dict[str, str] = {}  # the first waiting stage of each capability
    for stage in waiting:
        observability.metric("CapacityWaits", 1, capability=stage.agent_capability)
        first_of.setdefault(stage.agent_capability, stage.id)
    for capability, stage_id in first_of.items():
        _look_again(run_id, stage_id, capability, owner)
    return Reply(responses.Submitted(workflow_run_id=run_ref(run_id), status="queued"), 202)


def _look_again(run_id: uuid.UUID, stage_id: str, capability: str, owner: uuid.UUID) -> None:
    """First stages stored waiting: a slot given back before they were stored found no
    one waiting, so look once more, and send the first of them to a worker if there is
    room now (the worker takes the slot; a release meanwhile hands it one, and then this
    wakes none). One only: waking takes no slot, so every look would find the same room;
    the woken stage's release hands its slot to the next, and the sweeper wakes stages
    left waiting while a slot is free."""
    try:
        if waiting_reason(capability, owner) is None and wake_stage(run_id, stage_id):
            send_stage_messages(run_id, [stage_id], fast=True)
    except Exception:
        logger.exception(
            "could not look for a slot; the sweeper will", extra={"runId": str(run_id)}
        )


# How long a client over its active-run quota is told to wait before trying again.
ACTIVE_QUOTA_RETRY_SECONDS = 5


def hold_quota(session: Session, user_id: uuid.UUID) -> None:
    """Take the user's active-run quota for the session's transaction: what counts their
    live runs and then adds one (a submission, a retry) waits for any other doing so.
    Without it, concurrent submissions each counted the runs before the others' were
    stored, and twenty at once at a quota of three stored five."""
    session.execute(
        text("SELECT pg_advisory_xact_lock(hashtextextended(:name, 0))"),
        {"name": f"maof:active-runs:{user_id}"},
    )


def hold_key(session: Session, user_id: uuid.UUID, key: str) -> None:
    """Take the user's Idempotency-Key `key` for the session's transaction: a submission
    with it waits until another one with it has committed or failed, then finds its run.
    Without it, duplicates sent at once were each counted by the submission rate before
    any could see the run, and ten at a rate of three got three 429s. Taken before
    hold_quota, and nothing holding the quota waits for a key: they cannot deadlock."""
    session.execute(
        text("SELECT pg_advisory_xact_lock(hashtextextended(:name, 0))"),
        {"name": f"maof:submission-key:{user_id}:{key}"},
    )


def active_runs(session: Session, user_id: uuid.UUID) -> int:
    return int(
        session.execute(
            text(
                "SELECT count(*) FROM workflow_runs "
                "WHERE user_id = :user_id AND status IN ('queued', 'in_progress')"
            ),
            {"user_id": user_id},
        ).scalar_one()
    )


def over_quota(max_active: int) -> errors.RateLimited:
    return errors.RateLimited(
        f"You have {max_active} runs queued or in progress, the most allowed "
        "(MAOF_MAX_ACTIVE_RUNS); submit again when some have ended",
        ACTIVE_QUOTA_RETRY_SECONDS,
    )


KEY_DAYS = SUBMISSION_KEY_DAYS


def _earlier_submission(
    conn: Connection | Session, principal: Principal, key: str, body_hash: str, cutoff: datetime
) -> Reply | None:
    """The run a live Idempotency-Key already made (202, as the first answer was), a 409
    if the body differs, or None if the key is free or expired (taken before `cutoff`): an
    expired key answers nothing, as if it had never been used.

    `cutoff` is the one _SUBMIT used, not this statement's: a key it found live (and so
    did not take over) is found here even if it expired in between."""
    earlier = conn.execute(
        text(
            "SELECT k.body_hash, k.run_id, r.status FROM submission_keys AS k "
            "JOIN workflow_runs AS r ON r.id = k.run_id "
            "WHERE k.user_id = :user_id AND k.key = :key AND k.created_at >= :cutoff"
        ),
        {"user_id": principal.user_uuid, "key": key, "cutoff": cutoff},
    ).first()
    if earlier is None:
        return None
    if earlier.body_hash != body_hash:
        # Counted, as a refused definition is: past the rate, a live key would otherwise
        # have any number of other bodies read.
        limits.count_refused_submission(str(principal.user_uuid))
        raise errors.Conflict(
            "This Idempotency-Key was already used, with a different request body",
            [{"field": "Idempotency-Key", "message": "already used with another body"}],
        )
    return Reply(
        responses.Submitted(workflow_run_id=run_ref(earlier.run_id), status=earlier.status), 202
    )


# Keys taken before this are expired (kept until a submission under the quota takes the
# key over: nothing deletes them).
_KEY_CUTOFF = f"now() - make_interval(days => {KEY_DAYS})"

# The run (only while the user is under the active-run quota), its stages, its first audit
# entry and its Idempotency-Key (if any, and not taken since the cutoff); answers whether
# the run was stored and the key claimed (and the body's hash, to compare with the key's,
# and the cutoff, to read the key with).
_SUBMIT = text(
    f"""
    WITH allowed AS (
        SELECT count(*) < :max_active AS ok FROM workflow_runs
         WHERE user_id = :user_id AND status IN ('queued', 'in_progress')
    ), keyed AS (
        INSERT INTO submission_keys (user_id, key, body_hash, run_id)
        SELECT :user_id, CAST(:key AS text), :body_hash, :run_id
         WHERE CAST(:key AS text) IS NOT NULL AND (SELECT ok FROM allowed)
        ON CONFLICT (user_id, key) DO UPDATE
           SET body_hash = EXCLUDED.body_hash, run_id = EXCLUDED.run_id, created_at = now()
         WHERE submission_keys.created_at < {_KEY_CUTOFF}
     RETURNING run_id
    ), run AS (
        INSERT INTO workflow_runs (id, user_id, workflow_name, definition, input,
                                   output_bytes, status, deadline_at, callback_url,
                                   callback_secret_encrypted)
        SELECT :run_id, :user_id, :workflow_name, CAST(:definition AS jsonb),
               CAST(:input AS jsonb), :input_bytes, 'queued',
               now() + make_interval(secs => CAST(:timeout_ms AS bigint) / 1000.0),
               :callback_url, :callback_secret
         WHERE (SELECT ok FROM allowed)
           AND (CAST(:key AS text) IS NULL OR EXISTS (SELECT 1 FROM keyed))
     RETURNING id
    ), stages AS (
        INSERT INTO stage_executions (run_id, stage_id, stage_name, position, capability,
                                      dependencies, needs, input_template, config, status,
                                      queued_at, parked_at, waits)
        SELECT run.id, s.stage_id, s.stage_name, s.position, s.capability, s.dependencies,
               s.needs, CAST(s.input_template AS jsonb), CAST(s.config AS jsonb),
               CASE WHEN s.waiting THEN 'waiting' WHEN s.ready THEN 'queued' ELSE 'pending' END,
               CASE WHEN s.ready THEN now() END,
               CASE WHEN s.waiting THEN now() END,
               CASE WHEN s.waiting THEN 1 ELSE 0 END
          FROM run, jsonb_to_recordset(CAST(:stages AS jsonb)) AS s(
               stage_id text, stage_name text, position int, capability text,
               dependencies text[], needs text[], input_template text, config text,
               ready boolean, waiting boolean)
    ), entry AS (
        INSERT INTO execution_logs ({audit_rows.COLUMNS}) SELECT {audit_rows.VALUES} FROM run
    ), waits AS (
        INSERT INTO execution_logs ({audit_rows.COLUMNS})
        SELECT {audit_rows.RECORD_VALUES} FROM run, {audit_rows.RECORDS}
    )
    SELECT EXISTS (SELECT 1 FROM run) AS stored, EXISTS (SELECT 1 FROM keyed) AS keyed,
           CAST(:body_hash AS text) AS body_hash, {_KEY_CUTOFF} AS key_cutoff
    """
)


def _own_run(session: Session, principal: Principal, ref: str) -> WorkflowRun:
    run = session.get(WorkflowRun, parse_run_ref(ref))
    if run is None or run.user_id != principal.user_uuid:
        raise errors.NotFound("Workflow run not found")  # other users' runs do not exist
    return run


def _duration_ms(start: datetime | None, end: datetime | None) -> int | None:
    if start is None or end is None:
        return None
    return int((end - start).total_seconds() * 1000)


def stage_view(stage: StageExecution) -> responses.Stage:
    return responses.Stage(
        stage_id=stage.stage_id,
        name=stage.stage_name,
        agent_capability=stage.capability,
        dependencies=stage.dependencies,
        status=stage.status,
        agent_id=stage.agent_id,
        agent_uuid=stage.agent_uuid,
        attempt=stage.attempt,
        input=stage.input,
        output=stage.output,
        error_message=stage.error_message,
        queued_at=stage.queued_at,
        started_at=stage.started_at,
        completed_at=stage.completed_at,
        duration_ms=_duration_ms(stage.started_at, stage.completed_at),
    )


def run_summary(run: WorkflowRun) -> dict[str, Any]:
    """The fields every view of a run starts with (responses.RunSummary's)."""
    return {
        "workflow_run_id": run_ref(run.id),
        "workflow_name": run.workflow_name,
        "status": run.status,
        "created_at": run.created_at,
        "started_at": run.started_at,
        "completed_at": run.completed_at,
        "error_message": run.error_message,
        "deadline_at": run.deadline_at,
    }


def callback_view(run: WorkflowRun) -> responses.CallbackStatus | None:
    """Where the outcome is delivered and how that went (the secret is never shown)."""
    if run.callback_url is None:
        return None
    return responses.CallbackStatus(
        url=run.callback_url,
        state=run.callback_state,
        attempts=run.callback_attempts,
        last_error=run.callback_error,
    )


def get_run(principal: Principal, ref: str) -> responses.Run:
    with session_scope() as session:
        run = _own_run(session, principal, ref)
        stages = session.scalars(
            select(StageExecution)
            .where(StageExecution.run_id == run.id)
            .order_by(StageExecution.position)
        ).all()
    current = next((s.stage_id for s in stages if s.status == "in_progress"), None)
    return responses.Run(
        **run_summary(run),
        progress=responses.Progress(
            total=len(stages),
            completed=sum(s.status == "completed" for s in stages),
            failed=sum(s.status == "failed" for s in stages),
            current=current,
        ),
        input=run.input,
        callback=callback_view(run),
        stages=[stage_view(s) for s in stages],
    )


def list_runs(principal: Principal, query: RunQuery) -> responses.RunList:
    conditions = [WorkflowRun.user_id == principal.user_uuid]
    if query.status:
        conditions.append(WorkflowRun.status == query.status)
    # The page of runs first, then the stages of those runs only (a LATERAL count per run,
    # by the run_id index): counting before paging read every user's stages on each call.
    page = (
        select(WorkflowRun)
        .where(*conditions)
        .order_by(WorkflowRun.created_at.desc(), WorkflowRun.id)
        .offset(query.offset)
        .limit(query.limit)
        .subquery()
    )
    run = aliased(WorkflowRun, page)
    progress = (
        select(
            func.count().label("total"),
            func.count(case((StageExecution.status == "completed", 1))).label("completed"),
            func.count(case((StageExecution.status == "failed", 1))).label("failed"),
        )
        .where(StageExecution.run_id == run.id)
        .lateral()
    )
    with session_scope() as session:
        total = session.scalar(select(func.count()).select_from(WorkflowRun).where(*conditions))
        rows = session.execute(
            select(run, progress.c.total, progress.c.completed, progress.c.failed)
            .join(progress, true())
            .order_by(run.created_at.desc(), run.id)  # a subquery's order is not kept
        ).all()
    runs = [
        responses.ListedRun(
            **run_summary(row[0]),
            progress=responses.StageCounts(
                total=row.total, completed=row.completed, failed=row.failed
            ),
        )
        for row in rows
    ]
    return responses.RunList(runs=runs, meta=responses.PageMeta(**page_meta(total or 0, query)))


def get_result(principal: Principal, ref: str) -> responses.RunResult:
    with session_scope() as session:
        run = _own_run(session, principal, ref)
    if run.status != "completed":
        raise errors.NotFound(f"Workflow run has no result: it is {run.status}")
    return responses.RunResult(workflow_run_id=run_ref(run.id), output=run.output)
