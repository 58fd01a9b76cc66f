"""Backpressure: a stage that finds every capable agent full waits in Postgres (status
`waiting`, ordered by when it began to wait) instead of sleeping in SQS; runs remember
when one of their stages last got a slot, for round-robin hand-offs.

Revision ID: 0005_parked_stages
Revises: 0004_bounded_stages
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_parked_stages"
down_revision = "0004_bounded_stages"
branch_labels = None
depends_on = None

OLD = "status IN ('pending', 'queued', 'in_progress', 'completed', 'failed', 'skipped')"
NEW = "status IN ('pending', 'queued', 'waiting', 'in_progress', 'completed', 'failed', 'skipped')"


def upgrade() -> None:
    op.drop_constraint("stage_executions_status", "stage_executions")
    op.create_check_constraint("stage_executions_status", "stage_executions", NEW)
    op.add_column("stage_executions", sa.Column("parked_at", sa.DateTime(timezone=True)))
    op.add_column("workflow_runs", sa.Column("served_at", sa.DateTime(timezone=True)))
    # The hand-off looks for the waiting stages of a capability, oldest first.
    op.create_index(
        "stage_executions_waiting",
        "stage_executions",
        ["capability", "parked_at"],
        postgresql_where=sa.text("status = 'waiting'"),
    )


def downgrade() -> None:
    op.execute("UPDATE stage_executions SET status = 'queued' WHERE status = 'waiting'")
    op.drop_index("stage_executions_waiting", table_name="stage_executions")
    op.drop_column("workflow_runs", "served_at")
    op.drop_column("stage_executions", "parked_at")
    op.drop_constraint("stage_executions_status", "stage_executions")
    op.create_check_constraint("stage_executions_status", "stage_executions", OLD)
