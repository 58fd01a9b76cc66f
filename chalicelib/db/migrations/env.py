"""Alembic environment: migrate the database as its owner (MAOF_MIGRATION_DATABASE_URL,
else MAOF_DATABASE_URL), then give the application role its rights (db/roles.py)."""

from alembic import context
from sqlalchemy import create_engine

from chalicelib.config import get_settings
from chalicelib.db import _psycopg_url, get_engine
from chalicelib.db import roles as db_roles
from chalicelib.db.models import Base

target_metadata = Base.metadata


def _migrate(connection: object) -> None:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()
        settings = get_settings()
        db_roles.apply(connection, settings.database_url, settings.migration_database_url)  # type: ignore[arg-type]


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
    owner = create_engine(
        _psycopg_url(settings.migration_database_url),
        connect_args={"connect_timeout": 3, "application_name": "maof-migrate"},
        hide_parameters=True,
    )
    try:
        with owner.connect() as connection:
            _migrate(connection)
    finally:
        owner.dispose()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; set MAOF_DATABASE_URL")
run_migrations_online()
