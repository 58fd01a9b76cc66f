"""An index of each user's runs by when they ended: GET /stats finds the runs whose stages
may have ended in its window (the live ones, and those that ended in it) from the caller's
runs alone; it filtered every user's stage rows by their end before.

Revision ID: 0011_runs_by_end
Revises: 0010_prune_indexes
"""

from alembic import op
from sqlalchemy import text

from chalicelib.db.indexes import create_index_concurrently

revision = "0011_runs_by_end"
down_revision = "0010_prune_indexes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        create_index_concurrently(
            "workflow_runs_user_completed",
            "workflow_runs",
            ["user_id", "completed_at"],
            postgresql_where=text("completed_at IS NOT NULL"),
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "workflow_runs_user_completed", table_name="workflow_runs", postgresql_concurrently=True
        )
