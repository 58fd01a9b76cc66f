"""Submit a workflow run, and read runs, their results and their audit trail."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import case, func, select, text
from sqlalchemy.orm import Session

from chalicelib import errors, limits
from chalicelib.audit import chain
from chalicelib.config import get_settings
from chalicelib.db import autocommit_connection, session_scope
from chalicelib.db.models import AuditEntry, StageExecution, WorkflowRun
from chalicelib.engine import audit_rows
from chalicelib.engine.queue import send_stage_messages
from chalicelib.http import PageQuery, Principal, Reply, dumps, page_meta
from chalicelib.logs import logger
from chalicelib.workflows.definition import (
    ExecuteRequest,
    check_dag,
    check_input_sizes,
    check_timeouts,
    needed_outputs,
)

RUN_PREFIX = "wfr-"


class RunQuery(PageQuery):
    status: Literal["queued", "in_progress", "completed", "failed"] | None = None


def run_ref(run_id: uuid.UUID) -> str:
    return f"{RUN_PREFIX}{run_id}"


def parse_run_ref(value: str) -> uuid.UUID:
    if not value.startswith(RUN_PREFIX):
        raise errors.NotFound("Workflow run not found")
    try:
        return uuid.UUID(value[len(RUN_PREFIX) :])
    except ValueError:
        raise errors.NotFound("Workflow run not found") from None


def submit(principal: Principal, body: ExecuteRequest) -> Reply:
    """Store the run, its stages and the first audit entry in one statement (one round
    trip, one transaction), then queue the stages with no dependencies. If sending fails,
    the sweeper sends them later: the run is accepted.

    Limited per user: MAOF_SUBMISSIONS_PER_MINUTE, and at most MAOF_MAX_ACTIVE_RUNS runs
    queued or in progress (counted by the insert itself, so no extra round trip)."""
    check_dag(body.workflow)
    check_timeouts(body.workflow)
    check_input_sizes(body.workflow, body.input)
    limits.limit_submissions(str(principal.user_uuid))
    run_id = uuid.uuid4()
    stages = body.workflow.stages
    roots = [stage.id for stage in stages if not stage.dependencies]
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
                stage.config.model_dump(by_alias=True, exclude_none=True) if stage.config else None
            ),
            "ready": not stage.dependencies,
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
        input_hash=chain.sha256_json(body.input),
        details={"workflowName": body.workflow.name, "stages": len(stages)},
    )
    max_active = get_settings().max_active_runs
    with autocommit_connection() as conn:
        stored = conn.execute(
            _SUBMIT,
            {
                "max_active": max_active,
                "run_id": run_id,
                "user_id": principal.user_uuid,
                "workflow_name": body.workflow.name,
                "definition": dumps(body.workflow.model_dump(by_alias=True, mode="json")),
                "input": dumps(body.input),
                "stages": dumps(rows),
                **audit_rows.params(entry),
            },
        ).scalar()
    if not stored:
        raise errors.RateLimited(
            f"You have {max_active} runs queued or in progress, the most allowed "
            "(MAOF_MAX_ACTIVE_RUNS); submit again when some have ended",
            ACTIVE_QUOTA_RETRY_SECONDS,
        )
    try:
        send_stage_messages(run_id, roots, fast=True)
    except Exception:
        logger.exception(
            "could not queue a new run; the sweeper will", extra={"runId": str(run_id)}
        )
    return Reply({"workflowRunId": run_ref(run_id), "status": "queued"}, 202)


# How long a client over its active-run quota is told to wait before trying again.
ACTIVE_QUOTA_RETRY_SECONDS = 5

# The run (only while the user is under the active-run quota), its stages and its first
# audit entry; answers how many runs were stored (0 or 1).
_SUBMIT = text(
    f"""
    WITH run AS (
        INSERT INTO workflow_runs (id, user_id, workflow_name, definition, input, status)
        SELECT :run_id, :user_id, :workflow_name, CAST(:definition AS jsonb),
               CAST(:input AS jsonb), 'queued'
         WHERE (SELECT count(*) FROM workflow_runs
                 WHERE user_id = :user_id AND status IN ('queued', 'in_progress')) < :max_active
     RETURNING id
    ), stages AS (
        INSERT INTO stage_executions (run_id, stage_id, stage_name, position, capability,
                                      dependencies, needs, input_template, config, status,
                                      queued_at)
        SELECT run.id, s.stage_id, s.stage_name, s.position, s.capability, s.dependencies,
               s.needs, CAST(s.input_template AS jsonb), CAST(s.config AS jsonb),
               CASE WHEN s.ready THEN 'queued' ELSE 'pending' END,
               CASE WHEN s.ready THEN now() END
          FROM run, jsonb_to_recordset(CAST(:stages AS jsonb)) AS s(
               stage_id text, stage_name text, position int, capability text,
               dependencies text[], needs text[], input_template text, config text,
               ready boolean)
    ), entry AS (
        INSERT INTO execution_logs ({audit_rows.COLUMNS}) SELECT {audit_rows.VALUES} FROM run
    )
    SELECT count(*) FROM run
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


def stage_view(stage: StageExecution) -> dict[str, Any]:
    return {
        "stageId": stage.stage_id,
        "name": stage.stage_name,
        "agentCapability": stage.capability,
        "dependencies": stage.dependencies,
        "status": stage.status,
        "agentId": stage.agent_id,
        "agentUuid": str(stage.agent_uuid) if stage.agent_uuid else None,
        "attempt": stage.attempt,
        "input": stage.input,
        "output": stage.output,
        "errorMessage": stage.error_message,
        "queuedAt": stage.queued_at,
        "startedAt": stage.started_at,
        "completedAt": stage.completed_at,
        "durationMs": _duration_ms(stage.started_at, stage.completed_at),
    }


def _run_summary(run: WorkflowRun) -> dict[str, Any]:
    return {
        "workflowRunId": run_ref(run.id),
        "workflowName": run.workflow_name,
        "status": run.status,
        "createdAt": run.created_at,
        "startedAt": run.started_at,
        "completedAt": run.completed_at,
        "errorMessage": run.error_message,
    }


def get_run(principal: Principal, ref: str) -> dict[str, Any]:
    with session_scope() as session:
        run = _own_run(session, principal, ref)
        stages = session.scalars(
            select(StageExecution)
            .where(StageExecution.run_id == run.id)
            .order_by(StageExecution.position)
        ).all()
    current = next((s.stage_id for s in stages if s.status == "in_progress"), None)
    return {
        **_run_summary(run),
        "progress": {
            "total": len(stages),
            "completed": sum(s.status == "completed" for s in stages),
            "failed": sum(s.status == "failed" for s in stages),
            "current": current,
        },
        "input": run.input,
        "stages": [stage_view(s) for s in stages],
    }


def list_runs(principal: Principal, query: RunQuery) -> dict[str, Any]:
    conditions = [WorkflowRun.user_id == principal.user_uuid]
    if query.status:
        conditions.append(WorkflowRun.status == query.status)
    progress = (
        select(
            StageExecution.run_id,
            func.count().label("total"),
            func.count(case((StageExecution.status == "completed", 1))).label("completed"),
            func.count(case((StageExecution.status == "failed", 1))).label("failed"),
        )
        .group_by(StageExecution.run_id)
        .subquery()
    )
    with session_scope() as session:
        total = session.scalar(select(func.count()).select_from(WorkflowRun).where(*conditions))
        rows = session.execute(
            select(WorkflowRun, progress.c.total, progress.c.completed, progress.c.failed)
            .join(progress, progress.c.run_id == WorkflowRun.id)
            .where(*conditions)
            .order_by(WorkflowRun.created_at.desc(), WorkflowRun.id)
            .offset(query.offset)
            .limit(query.limit)
        ).all()
    runs = [
        {
            **_run_summary(row[0]),
            "progress": {"total": row.total, "completed": row.completed, "failed": row.failed},
        }
        for row in rows
    ]
    return {"runs": runs, "meta": page_meta(total or 0, query)}


def get_result(principal: Principal, ref: str) -> dict[str, Any]:
    with session_scope() as session:
        run = _own_run(session, principal, ref)
    if run.status != "completed":
        raise errors.NotFound(f"Workflow run has no result: it is {run.status}")
    return {"workflowRunId": ref, "output": run.output}


def get_audit(principal: Principal, ref: str) -> dict[str, Any]:
    with session_scope() as session:
        run = _own_run(session, principal, ref)
        entries = session.scalars(
            select(AuditEntry).where(AuditEntry.run_id == run.id).order_by(AuditEntry.seq)
        ).all()
    return {
        "workflowRunId": ref,
        "logs": [chain.entry_view(e) for e in entries],
        "chain": chain.verify(entries).view(),
    }
