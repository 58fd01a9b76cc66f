"""Tenancy and sessions: agent visibility, a token version per user, refresh-token families.

Revision ID: 0003_tenancy_sessions
Revises: 0002_agent_dispatch
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0003_tenancy_sessions"
down_revision = "0002_agent_dispatch"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Private agents serve only their owner's runs; shared ones (set by an admin) serve all.
    op.add_column(
        "agents",
        sa.Column("visibility", sa.String(10), nullable=False, server_default="private"),
    )
    op.create_check_constraint("agents_visibility", "agents", "visibility IN ('private', 'shared')")
    # Bumped by sign-out-everywhere and password changes: older access tokens stop working.
    op.add_column(
        "users", sa.Column("token_version", sa.Integer, nullable=False, server_default="0")
    )
    # One row per sign-in (a refresh-token family). Only the newest refresh token of a family
    # (current_jti) is valid; presenting an older one revokes the family.
    op.create_table(
        "auth_sessions",
        sa.Column("id", pg.UUID(as_uuid=True), primary_key=True),
        sa.Column(
            "user_id",
            pg.UUID(as_uuid=True),
            sa.ForeignKey("users.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("current_jti", pg.UUID(as_uuid=True), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column(
            "refreshed_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
        sa.Column("revoked_reason", sa.String(40)),
    )
    op.create_index(
        "auth_sessions_user_live",
        "auth_sessions",
        ["user_id"],
        postgresql_where=sa.text("revoked_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("auth_sessions_user_live", table_name="auth_sessions")
    op.drop_table("auth_sessions")
    op.drop_column("users", "token_version")
    op.drop_constraint("agents_visibility", "agents")
    op.drop_column("agents", "visibility")
