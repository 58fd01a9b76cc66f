"""Real agent dispatch: claim tokens, delayed retries, per-agent attempts and fallback.

Revision ID: 0002_agent_dispatch
Revises: 0001_initial
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0002_agent_dispatch"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # attempt is now the logical attempt (the Idempotency-Key's last part): 1 for the first.
    op.alter_column("stage_executions", "attempt", server_default="1")
    op.execute("UPDATE stage_executions SET attempt = 1 WHERE attempt = 0")
    # A fresh token per claim: only the worker holding the current claim may finish the stage.
    op.add_column("stage_executions", sa.Column("claim_token", pg.UUID(as_uuid=True)))
    # A queued stage is not run before this time (retry backoff, waiting for capacity).
    op.add_column("stage_executions", sa.Column("not_before", sa.DateTime(timezone=True)))
    # Attempts made on the current agent, and every agent that has had its turn.
    op.add_column(
        "stage_executions",
        sa.Column("agent_attempts", sa.Integer, nullable=False, server_default="0"),
    )
    op.add_column(
        "stage_executions",
        sa.Column(
            "tried_agents", pg.ARRAY(pg.UUID(as_uuid=True)), nullable=False, server_default="{}"
        ),
    )


def downgrade() -> None:
    op.drop_column("stage_executions", "tried_agents")
    op.drop_column("stage_executions", "agent_attempts")
    op.drop_column("stage_executions", "not_before")
    op.drop_column("stage_executions", "claim_token")
    op.alter_column("stage_executions", "attempt", server_default="0")
