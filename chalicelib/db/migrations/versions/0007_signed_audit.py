"""Signed audit entries and checkpoints: each entry records its rule version, the key that
signed it and its signature; signed Merkle checkpoints of the runs' final heads (their
copy of record is in S3, under Object Lock) and the runs each one covers.

Entries written before this revision keep their hash rule and stay version 1 (verified the
old way, reported as legacy, no signature); every entry written after it is version 2.
The application role gets INSERT and SELECT only on these tables (db/roles.py, applied
after every migration run).

Revision ID: 0007_signed_audit
Revises: 0006_run_control
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0007_signed_audit"
down_revision = "0006_run_control"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "execution_logs",
        sa.Column("version", sa.SmallInteger, nullable=False, server_default="1"),
    )
    op.add_column("execution_logs", sa.Column("kid", sa.String(64)))
    op.add_column("execution_logs", sa.Column("signature", sa.String(128)))
    # The checkpointer looks for runs with entries logged since its last checkpoint.
    op.create_index("execution_logs_logged_at", "execution_logs", ["logged_at"])

    op.create_table(
        "audit_checkpoints",
        sa.Column("checkpoint", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("tree_size", sa.Integer, nullable=False),
        sa.Column("root_hash", sa.String(64), nullable=False),
        sa.Column("head_hash", sa.String(64), nullable=False),
        sa.Column("head", pg.JSONB, nullable=False),
        sa.Column("object_key", sa.String(255), nullable=False),
        sa.Column("covered_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )
    op.create_table(
        "audit_checkpoint_runs",
        sa.Column(
            "checkpoint",
            sa.BigInteger,
            sa.ForeignKey("audit_checkpoints.checkpoint"),
            primary_key=True,
        ),
        sa.Column("leaf_index", sa.Integer, primary_key=True),
        sa.Column("run_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("head_hash", sa.String(64), nullable=False),
    )
    op.create_index("audit_checkpoint_runs_run", "audit_checkpoint_runs", ["run_id", "seq"])

    # Append-only, like execution_logs (whose trigger function names itself: a general one).
    op.execute(
        """
        CREATE FUNCTION audit_append_only() RETURNS trigger AS $$
        BEGIN
            RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
                USING ERRCODE = 'insufficient_privilege';
        END;
        $$ LANGUAGE plpgsql
        """
    )
    for table in ("audit_checkpoints", "audit_checkpoint_runs"):
        op.execute(
            f"CREATE TRIGGER {table}_no_update_delete BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION audit_append_only()"
        )
        op.execute(
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only()"
        )


def downgrade() -> None:
    op.execute("DROP TABLE audit_checkpoint_runs")
    op.execute("DROP TABLE audit_checkpoints")
    op.execute("DROP FUNCTION audit_append_only()")
    op.drop_index("execution_logs_logged_at", "execution_logs")
    # Dropping columns of execution_logs is an ALTER, which the row trigger does not see.
    op.drop_column("execution_logs", "signature")
    op.drop_column("execution_logs", "kid")
    op.drop_column("execution_logs", "version")
