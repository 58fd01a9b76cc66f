"""Indexes by age for what the sweeper deletes: Idempotency-Keys past their day and
sign-in sessions long expired (both tables grew without bound).

Revision ID: 0010_prune_indexes
Revises: 0009_agent_id_per_owner
"""

from alembic import op

from chalicelib.db.indexes import create_index_concurrently

revision = "0010_prune_indexes"
down_revision = "0009_agent_id_per_owner"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        create_index_concurrently(
            "submission_keys_created_at",
            "submission_keys",
            ["created_at"],
        )
        create_index_concurrently(
            "auth_sessions_expires_at",
            "auth_sessions",
            ["expires_at"],
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "auth_sessions_expires_at", table_name="auth_sessions", postgresql_concurrently=True
        )
        op.drop_index(
            "submission_keys_created_at", table_name="submission_keys", postgresql_concurrently=True
        )
