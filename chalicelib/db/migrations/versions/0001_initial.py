"""Users, agents, workflow runs, stage executions and the append-only audit log.

Revision ID: 0001_initial
Revises:
"""

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None

UUID = pg.UUID(as_uuid=True)


def _ts(name: str, nullable: bool = True, default: bool = False) -> sa.Column[Any]:
    return sa.Column(
        name,
        sa.DateTime(timezone=True),
        nullable=nullable,
        server_default=sa.func.now() if default else None,
    )


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", UUID, primary_key=True, server_default=sa.text("gen_random_uuid()")),
        sa.Column("email", sa.String(255), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(100), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("role", sa.String(20), nullable=False, server_default="user"),
        _ts("created_at", nullable=False, default=True),
        _ts("updated_at", nullable=False, default=True),
        sa.CheckConstraint("email = lower(email)", name="users_email_lower"),
    )
    op.create_table(
        "agents",
        sa.Column("id", UUID, primary_key=True, server_default=sa.text("gen_random_uuid()")),
        sa.Column("agent_id", sa.String(255), nullable=False),
        sa.Column("owner_id", UUID, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("description", sa.Text),
        sa.Column("endpoint", sa.String(2048), nullable=False),
        sa.Column("auth_token_encrypted", sa.Text, nullable=False),
        sa.Column("capabilities", pg.ARRAY(sa.String(100)), nullable=False),
        sa.Column("max_concurrent_tasks", sa.Integer, nullable=False, server_default="5"),
        sa.Column("status", sa.String(20), nullable=False, server_default="online"),
        _ts("last_health_check"),
        _ts("created_at", nullable=False, default=True),
        _ts("updated_at", nullable=False, default=True),
        _ts("deleted_at"),
        sa.CheckConstraint("status IN ('online', 'degraded', 'offline')", name="agents_status"),
    )
    op.create_index(
        "agents_agent_id_live",
        "agents",
        ["agent_id"],
        unique=True,
        postgresql_where=sa.text("deleted_at IS NULL"),
    )
    op.create_index("agents_capabilities_gin", "agents", ["capabilities"], postgresql_using="gin")
    op.create_index("agents_created_at", "agents", ["created_at"])

    op.create_table(
        "workflow_runs",
        sa.Column("id", UUID, primary_key=True, server_default=sa.text("gen_random_uuid()")),
        sa.Column("user_id", UUID, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("workflow_name", sa.String(255), nullable=False),
        sa.Column("definition", pg.JSONB, nullable=False),
        sa.Column("input", pg.JSONB),
        sa.Column("status", sa.String(20), nullable=False, server_default="queued"),
        sa.Column("output", pg.JSONB),
        sa.Column("error_message", sa.Text),
        _ts("created_at", nullable=False, default=True),
        _ts("started_at"),
        _ts("completed_at"),
        _ts("updated_at", nullable=False, default=True),
        sa.CheckConstraint(
            "status IN ('queued', 'in_progress', 'completed', 'failed')",
            name="workflow_runs_status",
        ),
    )
    op.create_index(
        "workflow_runs_user_created", "workflow_runs", ["user_id", sa.text("created_at DESC")]
    )
    op.create_index(
        "workflow_runs_user_status_created",
        "workflow_runs",
        ["user_id", "status", sa.text("created_at DESC")],
    )

    op.create_table(
        "stage_executions",
        sa.Column("id", UUID, primary_key=True, server_default=sa.text("gen_random_uuid()")),
        sa.Column(
            "run_id", UUID, sa.ForeignKey("workflow_runs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("stage_id", sa.String(100), nullable=False),
        sa.Column("stage_name", sa.String(255), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("capability", sa.String(100), nullable=False),
        sa.Column("dependencies", pg.ARRAY(sa.String(100)), nullable=False),
        sa.Column("input_template", pg.JSONB),
        sa.Column("config", pg.JSONB),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("agent_uuid", UUID, sa.ForeignKey("agents.id")),
        sa.Column("agent_id", sa.String(255)),
        sa.Column("input", pg.JSONB),
        sa.Column("output", pg.JSONB),
        sa.Column("error_message", sa.Text),
        sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
        _ts("queued_at"),
        _ts("started_at"),
        _ts("completed_at"),
        _ts("lease_expires_at"),
        sa.UniqueConstraint("run_id", "stage_id", name="stage_executions_run_stage"),
        sa.CheckConstraint(
            "status IN ('pending', 'queued', 'in_progress', 'completed', 'failed', 'skipped')",
            name="stage_executions_status",
        ),
    )
    op.create_index(
        "stage_executions_sweep",
        "stage_executions",
        ["status", "queued_at", "lease_expires_at"],
        postgresql_where=sa.text("status IN ('queued', 'in_progress')"),
    )

    op.create_table(
        "execution_logs",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("run_id", UUID, sa.ForeignKey("workflow_runs.id"), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("stage_id", sa.String(100)),
        sa.Column("agent_id", sa.String(255)),
        sa.Column("action", sa.String(40), nullable=False),
        sa.Column("status", sa.String(40), nullable=False),
        sa.Column("input_hash", sa.String(64)),
        sa.Column("output_hash", sa.String(64)),
        sa.Column("details", pg.JSONB),
        _ts("logged_at", nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("entry_hash", sa.String(64), nullable=False),
        sa.UniqueConstraint("run_id", "seq", name="execution_logs_run_seq"),
    )
    # The audit trail is append-only: the database itself refuses to change history.
    op.execute(
        """
        CREATE FUNCTION execution_logs_append_only() RETURNS trigger AS $$
        BEGIN
            RAISE EXCEPTION 'execution_logs is append-only: % refused', TG_OP
                USING ERRCODE = 'insufficient_privilege';
        END;
        $$ LANGUAGE plpgsql
        """
    )
    op.execute(
        """
        CREATE TRIGGER execution_logs_no_update_delete
        BEFORE UPDATE OR DELETE ON execution_logs
        FOR EACH ROW EXECUTE FUNCTION execution_logs_append_only()
        """
    )
    op.execute(
        """
        CREATE TRIGGER execution_logs_no_truncate
        BEFORE TRUNCATE ON execution_logs
        FOR EACH STATEMENT EXECUTE FUNCTION execution_logs_append_only()
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE execution_logs")
    op.execute("DROP FUNCTION execution_logs_append_only()")
    op.drop_table("stage_executions")
    op.drop_table("workflow_runs")
    op.drop_table("agents")
    op.drop_table("users")
