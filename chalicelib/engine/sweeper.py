"""The scheduled sweeper: no accepted run is stranded by a lost message or a dead worker.

It re-queues stages that have sat `queued` longer than MAOF_SWEEP_QUEUED_AFTER_SECONDS
(their message was lost between commit and send, or is long delayed: a duplicate is
harmless, the claim makes it a no-op) and stages `in_progress` whose lease expired
(their worker died mid-stage), then sends their messages again.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import timedelta

from sqlalchemy import text

from chalicelib.audit import chain
from chalicelib.config import get_settings
from chalicelib.db import session_scope
from chalicelib.db.models import WorkflowRun
from chalicelib.engine.queue import send_stage_messages
from chalicelib.logs import logger

BATCH_LIMIT = 500


def find_stalled() -> dict[uuid.UUID, list[str]]:
    """Stalled stages by run (read without locks; each is re-checked under the run lock)."""
    grace = timedelta(seconds=get_settings().sweep_queued_after_seconds)
    with session_scope() as session:
        rows = session.execute(
            text(
                """
                SELECT run_id, stage_id FROM stage_executions
                 WHERE (status = 'queued' AND queued_at <= now() - :grace
                        AND (not_before IS NULL OR not_before <= now() - :grace))
                    OR (status = 'in_progress' AND lease_expires_at <= now())
                 LIMIT :limit
                """
            ),
            {"grace": grace, "limit": BATCH_LIMIT},
        ).all()
    stalled: dict[uuid.UUID, list[str]] = defaultdict(list)
    for row in rows:
        stalled[row.run_id].append(row.stage_id)
    return stalled


def requeue_run_stages(run_id: uuid.UUID, stage_ids: list[str]) -> list[str]:
    """Re-queue the still-stalled stages of one run, with an audit entry each."""
    grace = timedelta(seconds=get_settings().sweep_queued_after_seconds)
    with session_scope() as session:
        # Same lock order as completing a stage (run, then stages): no deadlock.
        session.get(WorkflowRun, run_id, with_for_update=True)
        rows = session.execute(
            text(
                """
                UPDATE stage_executions AS s
                   SET status = 'queued', queued_at = now(), lease_expires_at = NULL,
                       claim_token = NULL
                  FROM (SELECT id, status FROM stage_executions
                         WHERE run_id = :run_id AND stage_id = ANY (:stage_ids)
                           AND ((status = 'queued' AND queued_at <= now() - :grace
                                 AND (not_before IS NULL OR not_before <= now() - :grace))
                                OR (status = 'in_progress' AND lease_expires_at <= now()))
                           FOR UPDATE) AS old
                 WHERE s.id = old.id
             RETURNING s.stage_id, s.attempt, old.status AS was
                """
            ),
            {"run_id": run_id, "stage_ids": stage_ids, "grace": grace},
        ).all()
        for row in rows:
            reason = "lease expired" if row.was == "in_progress" else "message not consumed"
            chain.append(
                session,
                run_id,
                "requeue",
                "queued",
                stage_id=row.stage_id,
                details={"reason": reason, "attempt": row.attempt},
            )
    return [row.stage_id for row in rows]


def sweep() -> dict[str, int]:
    """One sweep: re-queue and re-send every stalled stage."""
    requeued = 0
    for run_id, stage_ids in find_stalled().items():
        ready = requeue_run_stages(run_id, stage_ids)
        if ready:
            send_stage_messages(run_id, ready)
            requeued += len(ready)
            logger.info("sweeper re-queued stages", extra={"runId": str(run_id), "stages": ready})
    return {"requeued": requeued}
