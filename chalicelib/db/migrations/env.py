"""Alembic environment: migrate the database as its owner (MAOF_MIGRATION_DATABASE_URL,
else MAOF_DATABASE_URL), then give the application role its rights (db/roles.py)."""

import contextlib
import time

from alembic import context
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from chalicelib.config import get_settings
from chalicelib.db import get_engine
from chalicelib.db import roles as db_roles
from chalicelib.db.models import Base
from chalicelib.logs import logger

target_metadata = Base.metadata


# One migration at a time per database (the migrate function invoked twice, `make migrate`
# during a deploy): the advisory lock's key, "maofmigr".
MIGRATION_LOCK_KEY = 0x6D616F666D696772
LOCK_POLL_SECONDS = 0.5


def _lock(connection: Connection) -> None:
    """Take the migration lock, waiting for as long as another run holds it. Polled, not
    pg_advisory_lock: a transaction waiting in it keeps a snapshot, which the holder's
    CREATE INDEX CONCURRENTLY waits for in turn (a deadlock); each try here ends at once."""
    waiting = False
    while True:
        taken = connection.execute(
            text("SELECT pg_try_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
        ).scalar()
        connection.commit()
        if taken:
            return
        if not waiting:
            logger.info("another migration is running: waiting for it to end")
            waiting = True
        time.sleep(LOCK_POLL_SECONDS)


def _migrate(connection: Connection) -> None:
    """Migrate under the migration lock: a second run waits for the first, then finds the
    database at head and does nothing. The lock is session-level, so it lasts through the
    migrations' own commits (each CONCURRENTLY index is built outside a transaction)."""
    _lock(connection)
    try:
        context.configure(connection=connection, target_metadata=target_metadata)
        # What the database was at once this run held the lock: a run that waited for
        # another reports what it found, not what was there before the other ran.
        context.config.attributes["revision_found"] = context.get_context().get_current_revision()
        with context.begin_transaction():
            context.run_migrations()
            settings = get_settings()
            db_roles.apply(connection, settings.database_url, settings.migration_database_url)
    finally:
        # A connection broken mid-migration has lost the lock already; its error is the one
        # worth raising.
        with contextlib.suppress(DBAPIError):
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
            connection.commit()


def run_migrations_online() -> None:
    connectable = context.config.attributes.get("connection")
    if connectable is not None:
        _migrate(connectable)
        return
    settings = get_settings()
    if settings.migration_database_url == settings.database_url:
        with get_engine().connect() as connection:
            _migrate(connection)
        return
    from chalicelib.db.migrate import owner_engine

    owner = owner_engine()
    try:
        with owner.connect() as connection:
            _migrate(connection)
    finally:
        owner.dispose()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; set MAOF_DATABASE_URL")
run_migrations_online()
