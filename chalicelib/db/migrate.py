"""Apply the Alembic migrations as the database's owner (MAOF_MIGRATION_DATABASE_URL, else
MAOF_DATABASE_URL), and give the application role (MAOF_DATABASE_URL) its rights.

The migration scripts live inside the package (`chalicelib/db/migrations`), so the Lambda
zip that `chalice package` builds (app.py, chalicelib/ and the requirements) carries them:
the deployed `migrate` function runs exactly what `make migrate` runs locally.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import cast

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine

from chalicelib.config import ConfigError, get_settings
from chalicelib.db import _psycopg_url

SCRIPT_LOCATION = Path(__file__).resolve().parent / "migrations"


def alembic_config() -> Config:
    """The Alembic configuration, built in code: no alembic.ini is needed (none is deployed)."""
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    return config


def owner_engine() -> Engine:
    """A short-lived engine as the migrations' role (the owner); outside dev its URL must
    ask for TLS, as the application's must (Settings.tls_problem)."""
    settings = get_settings()
    if problem := settings.tls_problem("migration_database_url"):
        raise ConfigError(problem)
    return create_engine(
        _psycopg_url(settings.migration_database_url),
        connect_args={"connect_timeout": 3, "application_name": "maof-migrate"},
        hide_parameters=True,
    )


def upgrade() -> str | None:
    """Upgrade to head; return the revision the database was at once the migration lock
    was held (None: no schema yet)."""
    config = alembic_config()
    command.upgrade(config, "head")
    return cast(str | None, config.attributes.get("revision_found"))


def main() -> int:
    try:
        upgrade()
    except ConfigError as exc:
        print(f"maof: configuration error: {exc}", file=sys.stderr)
        return 2
    print("maof: database migrated to head")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
