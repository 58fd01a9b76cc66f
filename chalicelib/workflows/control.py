"""Steering a run after it was submitted: cancel it, or retry it from where it failed."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import text

from chalicelib import limits
from chalicelib.audit import chain
from chalicelib.config import get_settings
from chalicelib.core import errors, responses
from chalicelib.core.api import Principal, Reply, parse_run_ref, run_ref
from chalicelib.core.encoding import dumps, served_size
from chalicelib.db import session_scope
from chalicelib.engine import stages
from chalicelib.engine.queue import send_stage_messages
from chalicelib.logs import logger
from chalicelib.workflows import runs

RETRYABLE_RUNS = ("failed", "cancelled")


def _owned(session: Any, principal: Principal, ref: str) -> stages.LockedRun:
    """The caller's run, its row locked (another user's run does not exist: 404)."""
    run_id = parse_run_ref(ref)
    owner = session.execute(
        text("SELECT user_id FROM workflow_runs WHERE id = :id"), {"id": run_id}
    ).scalar()
    if owner != principal.user_uuid:
        raise errors.NotFound("Workflow run not found")
    return stages.lock_run(session, run_id)


def cancel(principal: Principal, ref: str) -> Reply:
    """End a queued or running run now: stages not started are cancelled, no agent is
    called again for it, and what an agent still working answers is discarded."""
    with session_scope() as session:
        run = _owned(session, principal, ref)
        if not run.live:
            raise errors.Conflict(f"The run has already ended: it is {run.status}")
        ended = stages.end_run(
            session,
            run,
            "cancelled",
            f"Cancelled by {principal.email}",
            "cancel",
            {"by": principal.email, "userUuid": str(principal.user_uuid)},
        )
    return Reply(
        responses.Cancelled(
            workflow_run_id=run_ref(run.id), status="cancelled", stages_cancelled=ended
        ),
        202,
    )


def retry(principal: Principal, ref: str) -> Reply:
    """Run a failed or cancelled run again from where it stopped: completed stages keep
    their outputs; the others start afresh (new attempt numbers, so new Idempotency-Keys;
    counters reset; agents chosen anew), under the same run id and audit chain. A stage
    whose agent was still working when the run ended starts afresh too: that call's
    answer is not kept (a `discard` entry says so now). The run is live again: it counts
    against MAOF_MAX_ACTIVE_RUNS and MAOF_SUBMISSIONS_PER_MINUTE as a new submission
    would (it starts the same work over: cancel and retry must not outrun the rate), and
    at most MAOF_RUN_MAX_RETRIES times (each adds to the run's one audit chain)."""
    limits.limit_submissions(str(principal.user_uuid))
    max_active = get_settings().max_active_runs
    with session_scope() as session:
        runs.hold_quota(session, principal.user_uuid)  # first: submissions take it first too
        run = _owned(session, principal, ref)
        if run.status not in RETRYABLE_RUNS:
            raise errors.Conflict(
                f"Only a failed or cancelled run can be retried; this one is {run.status}"
            )
        retried = session.execute(_RETRIES, {"run_id": run.id}).scalar_one()
        if retried >= get_settings().run_max_retries:
            raise errors.Conflict(
                f"This run was retried {retried} times (MAOF_RUN_MAX_RETRIES): "
                "submit the workflow anew"
            )
        if runs.active_runs(session, principal.user_uuid) >= max_active:
            raise runs.over_quota(max_active)
        in_flight = session.execute(_IN_FLIGHT, {"run_id": run.id}).all()
        # The reset clears the inputs failed stages stored: they no longer count against
        # MAOF_RUN_MAX_OUTPUT_BYTES, or each retry would shrink what the run may store.
        cleared = session.scalars(_STORED_INPUTS, {"run_id": run.id}).all()
        freed = sum(served_size(dumps(value)) for value in cleared)
        reset = session.execute(_RESET, {"run_id": run.id}).all()
        ready = [row.stage_id for row in reset if row.status == "queued"]
        for stage in in_flight:
            # Its worker's claim is gone with the reset: what it answers is not stored.
            chain.append(
                session,
                run.id,
                "discard",
                stages.ended_stage_status(run.status),
                stage_id=stage.stage_id,
                agent_id=stage.agent_id,
                details={
                    "reason": "the run was retried while the stage was in progress: "
                    "what its agent answers is not kept",
                    "attempt": stage.attempt,
                },
            )
        chain.append(
            session,
            run.id,
            "retry-run",
            "queued",
            details={
                "by": principal.email,
                "userUuid": str(principal.user_uuid),
                "was": run.status,
                "stages": sorted(row.stage_id for row in reset),
            },
        )
        session.execute(
            text(
                "UPDATE workflow_runs SET status = 'in_progress', error_message = NULL, "
                "output = NULL, completed_at = NULL, updated_at = now(), "
                "output_bytes = GREATEST(output_bytes - :freed, 0), "
                # A delivery still in flight for the earlier end records nothing: its
                # outcome is matched by its delivery id.
                "callback_state = NULL, callback_next_at = NULL, callback_delivery = NULL, "
                "callback_attempts = 0, callback_error = NULL, "
                "deadline_at = now() + make_interval(secs => "
                "  CAST(definition ->> 'timeoutMs' AS bigint) / 1000.0) "
                "WHERE id = :run_id"
            ),
            {"run_id": run.id, "freed": freed},
        )
    _queue(run.id, ready)
    return Reply(
        responses.Retried(
            workflow_run_id=run_ref(run.id), status="in_progress", stages_requeued=ready
        ),
        202,
    )


def _queue(run_id: uuid.UUID, stage_ids: list[str]) -> None:
    try:
        send_stage_messages(run_id, stage_ids, fast=True)
    except Exception:
        logger.exception(
            "could not queue a retried run; the sweeper will", extra={"runId": str(run_id)}
        )


# Each retry wrote one `retry-run` entry (in the run's chain, by its run_id index).
_RETRIES = text(
    "SELECT count(*) FROM execution_logs WHERE run_id = :run_id AND action = 'retry-run'"
)

# Stages still in progress when their run ended: their agents may still be working. Their
# rows are locked (after the run's, as everywhere) before the reset changes them.
_IN_FLIGHT = text(
    """
    SELECT stage_id, agent_id, attempt FROM stage_executions
     WHERE run_id = :run_id AND status = 'in_progress'
     ORDER BY position
       FOR UPDATE
    """
)

# The inputs stored by failed stages (fail_stage counted each it stored), which the reset
# clears.
_STORED_INPUTS = text(
    "SELECT input FROM stage_executions "
    "WHERE run_id = :run_id AND status = 'failed' AND input IS NOT NULL"
)

# Every stage that did not complete starts afresh: queued when its dependencies are all
# completed, else pending; the next attempt number (an agent that remembers keys must see
# new work), every counter at zero, no agent chosen yet. A stage still in progress too:
# its claim token is cleared, so its worker, when its agent answers, finds the claim gone
# and writes nothing (and renews no lease); the agent slot that call holds is given back
# by that worker as the call ends, as always.
_RESET = text(
    """
    UPDATE stage_executions AS s
       SET status = CASE WHEN NOT EXISTS (
                       SELECT 1 FROM stage_executions AS d
                        WHERE d.run_id = s.run_id AND d.stage_id = ANY (s.dependencies)
                          AND d.status <> 'completed')
                    THEN 'queued' ELSE 'pending' END,
           queued_at = now(), attempt = s.attempt + 1, agent_uuid = NULL, agent_id = NULL,
           agent_attempts = 0, errors = 0, lease_expiries = 0, requeues = 0, waits = 0,
           tried_agents = '{}', error_message = NULL, input = NULL, output = NULL,
           started_at = NULL, completed_at = NULL, not_before = NULL, parked_at = NULL,
           lease_expires_at = NULL, claim_token = NULL
     WHERE s.run_id = :run_id AND s.status <> 'completed'
 RETURNING s.stage_id, s.status
    """
)
