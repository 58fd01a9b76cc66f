"""Secrets nothing will use again are cleared, not kept (and re-encrypted at every key
rotation) for as long as the database lives: a deleted agent's token (the column may now
be NULL), and the callback secret of a completed run whose callback was delivered or
given up (a completed run is never retried, so it ends no more). Those already kept
are cleared here.

Revision ID: 0014_forget_secrets
Revises: 0013_waiting_runs
"""

import sqlalchemy as sa
from alembic import op

revision = "0014_forget_secrets"
down_revision = "0013_waiting_runs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.alter_column("agents", "auth_token_encrypted", existing_type=sa.Text, nullable=True)
    op.execute(
        "UPDATE agents SET auth_token_encrypted = NULL "
        "WHERE deleted_at IS NOT NULL AND auth_token_encrypted IS NOT NULL"
    )
    op.execute(
        "UPDATE workflow_runs SET callback_secret_encrypted = NULL "
        "WHERE status = 'completed' AND callback_state IN ('delivered', 'failed') "
        "AND callback_secret_encrypted IS NOT NULL"
    )


def downgrade() -> None:
    # The tokens are gone: deleted agents get an empty one (no key reads it, so a
    # re-encryption counts it as unreadable), as the column requires one again.
    op.execute("UPDATE agents SET auth_token_encrypted = '' WHERE auth_token_encrypted IS NULL")
    op.alter_column("agents", "auth_token_encrypted", existing_type=sa.Text, nullable=False)
