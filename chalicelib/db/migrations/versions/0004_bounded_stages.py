"""Every run ends: per-stage counters that bound every way a stage can go round again, the
stage ids whose outputs a stage reads, and a run's stored output total.

Revision ID: 0004_bounded_stages
Revises: 0003_tenancy_sessions
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_bounded_stages"
down_revision = "0003_tenancy_sessions"
branch_labels = None
depends_on = None

COUNTERS = ("errors", "lease_expiries", "requeues", "waits")


def upgrade() -> None:
    for name in COUNTERS:
        op.add_column(
            "stage_executions", sa.Column(name, sa.Integer, nullable=False, server_default="0")
        )
    # The stages whose outputs this stage's input reads (NULL: every completed stage, as
    # for stages stored before this revision).
    op.add_column("stage_executions", sa.Column("needs", sa.ARRAY(sa.String(100))))
    op.add_column(
        "workflow_runs",
        sa.Column("output_bytes", sa.BigInteger, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_column("workflow_runs", "output_bytes")
    op.drop_column("stage_executions", "needs")
    for name in COUNTERS:
        op.drop_column("stage_executions", name)
