"""Index builds for the migrations that must not block writers (CREATE INDEX CONCURRENTLY)."""

from __future__ import annotations

from typing import Any

from alembic import op
from sqlalchemy import text


def create_index_concurrently(name: str, table: str, columns: list[str], **kw: Any) -> None:
    """Build index `name` on `table` CONCURRENTLY, finishing whatever an earlier attempt
    left: an interrupted build (a timeout, a cancel, a Ctrl-C) leaves the index behind
    INVALID (pg_index.indisvalid), unused by the planner yet in the way of a new build, so
    it is dropped first; a valid one (built, but the revision not stamped) is kept.
    Call it inside `op.get_context().autocommit_block()`; `kw` goes to `op.create_index`."""
    valid = (
        op.get_bind()
        .execute(
            text("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)"),
            {"name": name},
        )
        .scalar()
    )
    if valid is False:
        op.drop_index(name, table_name=table, postgresql_concurrently=True, if_exists=True)
    op.create_index(name, table, columns, postgresql_concurrently=True, if_not_exists=True, **kw)
