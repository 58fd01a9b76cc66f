"""Alembic environment: migrate the database as its owner (MAOF_MIGRATION_DATABASE_URL,
else MAOF_DATABASE_URL), then give the application role its rights (db/roles.py)."""

from alembic import context
from sqlalchemy import Connection

from chalicelib.config import get_settings
from chalicelib.db import get_engine
from chalicelib.db import roles as db_roles
from chalicelib.db.models import Base

target_metadata = Base.metadata


def _migrate(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()
        settings = get_settings()
        db_roles.apply(connection, settings.database_url, settings.migration_database_url)


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
