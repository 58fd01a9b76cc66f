"""An agentId is unique among its owner's live agents, not across every account: a
global name let any user learn, by a 409, that another account has an agent of that
name, and take names another account's scripts register (squatting).

Revision ID: 0009_agent_id_per_owner
Revises: 0008_claim_index
"""

import sqlalchemy as sa
from alembic import op

from chalicelib.db.indexes import create_index_concurrently

revision = "0009_agent_id_per_owner"
down_revision = "0008_claim_index"
branch_labels = None
depends_on = None

LIVE = sa.text("deleted_at IS NULL")


def upgrade() -> None:
    with op.get_context().autocommit_block():
        create_index_concurrently(
            "agents_owner_agent_id_live",
            "agents",
            ["owner_id", "agent_id"],
            unique=True,
            postgresql_where=LIVE,
        )
        op.drop_index(
            "agents_agent_id_live",
            table_name="agents",
            postgresql_concurrently=True,
            if_exists=True,
        )


def downgrade() -> None:
    # Fails, as it should, once two accounts hold the same agentId.
    with op.get_context().autocommit_block():
        create_index_concurrently(
            "agents_agent_id_live",
            "agents",
            ["agent_id"],
            unique=True,
            postgresql_where=LIVE,
        )
        op.drop_index(
            "agents_owner_agent_id_live", table_name="agents", postgresql_concurrently=True
        )
