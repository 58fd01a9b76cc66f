"""Apply the Alembic migrations to the database named by MAOF_DATABASE_URL."""

from __future__ import annotations

import os
import sys

from alembic import command
from alembic.config import Config

from chalicelib.config import ConfigError

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def alembic_config() -> Config:
    config = Config(os.path.join(PROJECT_DIR, "alembic.ini"))
    config.set_main_option("script_location", os.path.join(PROJECT_DIR, "migrations"))
    return config


def upgrade() -> None:
    command.upgrade(alembic_config(), "head")


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
