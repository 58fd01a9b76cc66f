"""`GET /stats`: what the caller's runs did over the last hour, from Postgres (the
readable counterpart, locally, of the CloudWatch metrics a deployment emits)."""

from __future__ import annotations

from sqlalchemy import text

from chalicelib.core import responses
from chalicelib.core.api import Principal
from chalicelib.db import session_scope

WINDOW = "1 hour"


# The caller's runs active in the window: live now, or ended within it (a run may last
# 24 h: one created earlier and live still counts). Found by their indexes first, then
# their stages by the run_id index (an array, so no plan reads every user's stages).
_ACTIVE_RUNS = """
    ARRAY(SELECT r.id FROM workflow_runs AS r
           WHERE r.user_id = :user
             AND (r.status IN ('queued', 'in_progress')
                  OR r.completed_at >= now() - CAST(:window AS interval)))
"""


def stats(principal: Principal) -> responses.Stats:
    """The caller's runs active in the window (live, or ended in it) and their stages, by
    status; per agent, their stages that ended in the window. All three cover the same
    runs: a long run created before the window is counted while it is live."""
    params = {"user": principal.user_uuid, "window": WINDOW}
    with session_scope() as session:
        runs = session.execute(
            text(
                f"SELECT status, count(*) AS n FROM workflow_runs "
                f"WHERE id = ANY ({_ACTIVE_RUNS}) GROUP BY status"
            ),
            params,
        ).all()
        stages = session.execute(
            text(
                f"SELECT status, count(*) AS n FROM stage_executions "
                f"WHERE run_id = ANY ({_ACTIVE_RUNS}) GROUP BY status"
            ),
            params,
        ).all()
        agents = session.execute(
            text(
                f"""
                SELECT s.agent_uuid, s.agent_id,
                       count(*) FILTER (WHERE s.status = 'completed') AS completed,
                       count(*) FILTER (WHERE s.status = 'failed') AS failed,
                       percentile_cont(0.5) WITHIN GROUP (ORDER BY
                           EXTRACT(EPOCH FROM s.completed_at - s.started_at) * 1000)
                           FILTER (WHERE s.status = 'completed') AS p50_ms,
                       percentile_cont(0.95) WITHIN GROUP (ORDER BY
                           EXTRACT(EPOCH FROM s.completed_at - s.started_at) * 1000)
                           FILTER (WHERE s.status = 'completed') AS p95_ms
                  FROM stage_executions AS s
                 WHERE s.run_id = ANY ({_ACTIVE_RUNS})
                   AND s.agent_id IS NOT NULL
                   AND s.completed_at >= now() - CAST(:window AS interval)
                   AND s.status IN ('completed', 'failed')
                 GROUP BY s.agent_uuid, s.agent_id ORDER BY s.agent_id, s.agent_uuid
                """
            ),
            params,
        ).all()
    return responses.Stats(
        window=WINDOW,
        runs={row.status: row.n for row in runs},
        stages={row.status: row.n for row in stages},
        agents=[
            responses.AgentStats(
                agent_uuid=row.agent_uuid,
                agent_id=row.agent_id,
                completed=row.completed,
                failed=row.failed,
                stage_p50_ms=None if row.p50_ms is None else round(row.p50_ms),
                stage_p95_ms=None if row.p95_ms is None else round(row.p95_ms),
            )
            for row in agents
        ],
    )
