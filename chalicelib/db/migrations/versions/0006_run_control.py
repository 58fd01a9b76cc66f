"""Run control: cancelled runs and stages, run deadlines, completion callbacks, and the
idempotency keys of submissions.

Revision ID: 0006_run_control
Revises: 0005_parked_stages
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0006_run_control"
down_revision = "0005_parked_stages"
branch_labels = None
depends_on = None

RUN_OLD = "status IN ('queued', 'in_progress', 'completed', 'failed')"
RUN_NEW = "status IN ('queued', 'in_progress', 'completed', 'failed', 'cancelled')"
STAGE_OLD = (
    "status IN ('pending', 'queued', 'waiting', 'in_progress', 'completed', 'failed', 'skipped')"
)
STAGE_NEW = (
    "status IN ('pending', 'queued', 'waiting', 'in_progress', 'completed', 'failed', "
    "'skipped', 'cancelled')"
)


def upgrade() -> None:
    op.drop_constraint("workflow_runs_status", "workflow_runs")
    op.create_check_constraint("workflow_runs_status", "workflow_runs", RUN_NEW)
    op.drop_constraint("stage_executions_status", "stage_executions")
    op.create_check_constraint("stage_executions_status", "stage_executions", STAGE_NEW)
    # workflow.timeoutMs: when the run fails if it has not ended (the sweeper enforces it).
    op.add_column("workflow_runs", sa.Column("deadline_at", sa.DateTime(timezone=True)))
    # The completion callback: where, its secret (encrypted like agent tokens), and the
    # state of its delivery (pending → delivered | failed), retried with backoff.
    op.add_column("workflow_runs", sa.Column("callback_url", sa.String(2048)))
    op.add_column("workflow_runs", sa.Column("callback_secret_encrypted", sa.Text))
    op.add_column("workflow_runs", sa.Column("callback_state", sa.String(20)))
    op.add_column(
        "workflow_runs",
        sa.Column("callback_attempts", sa.Integer, nullable=False, server_default="0"),
    )
    op.add_column("workflow_runs", sa.Column("callback_next_at", sa.DateTime(timezone=True)))
    op.add_column("workflow_runs", sa.Column("callback_delivery", pg.UUID(as_uuid=True)))
    op.add_column("workflow_runs", sa.Column("callback_error", sa.Text))
    op.create_index(
        "workflow_runs_callbacks_due",
        "workflow_runs",
        ["callback_next_at"],
        postgresql_where=sa.text("callback_state = 'pending'"),
    )
    op.create_index(
        "workflow_runs_deadlines",
        "workflow_runs",
        ["deadline_at"],
        postgresql_where=sa.text("status IN ('queued', 'in_progress') AND deadline_at IS NOT NULL"),
    )
    # Idempotency-Key of POST /workflows/execute, per user, kept 24 hours.
    op.create_table(
        "submission_keys",
        sa.Column(
            "user_id",
            pg.UUID(as_uuid=True),
            sa.ForeignKey("users.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("body_hash", sa.String(64), nullable=False),
        sa.Column("run_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )


def downgrade() -> None:
    op.drop_table("submission_keys")
    op.drop_index("workflow_runs_deadlines", table_name="workflow_runs")
    op.drop_index("workflow_runs_callbacks_due", table_name="workflow_runs")
    for column in (
        "callback_error",
        "callback_delivery",
        "callback_next_at",
        "callback_attempts",
        "callback_state",
        "callback_secret_encrypted",
        "callback_url",
        "deadline_at",
    ):
        op.drop_column("workflow_runs", column)
    op.execute("UPDATE stage_executions SET status = 'skipped' WHERE status = 'cancelled'")
    op.execute("UPDATE workflow_runs SET status = 'failed' WHERE status = 'cancelled'")
    op.drop_constraint("stage_executions_status", "stage_executions")
    op.create_check_constraint("stage_executions_status", "stage_executions", STAGE_OLD)
    op.drop_constraint("workflow_runs_status", "workflow_runs")
    op.create_check_constraint("workflow_runs_status", "workflow_runs", RUN_OLD)
