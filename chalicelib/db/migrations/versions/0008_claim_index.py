"""Lease renewals find a worker's stages by their claim tokens through an index: every
worker renews every few seconds, and without it each renewal read the whole table.
Built CONCURRENTLY (outside the migration's transaction): a deployed stage keeps writing
its stages while a big table is indexed.

Revision ID: 0008_claim_index
Revises: 0007_signed_audit
"""

import sqlalchemy as sa
from alembic import op

from chalicelib.db.indexes import create_index_concurrently

revision = "0008_claim_index"
down_revision = "0007_signed_audit"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        create_index_concurrently(
            "stage_executions_claims",
            "stage_executions",
            ["claim_token"],
            postgresql_where=sa.text("status = 'in_progress'"),
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "stage_executions_claims", table_name="stage_executions", postgresql_concurrently=True
        )
