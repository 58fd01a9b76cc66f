"""Database access: one engine per process, one session per unit of work."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from chalicelib import errors
from chalicelib.config import get_settings

# The Alembic revision this code expects; tests check it is the migrations' head.
SCHEMA_REVISION = "0002_agent_dispatch"


def _psycopg_url(url: str) -> str:
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


@functools.lru_cache(maxsize=1)
def get_engine() -> Engine:
    settings = get_settings()
    return create_engine(
        _psycopg_url(settings.database_url),
        pool_size=5,
        max_overflow=10,
        pool_pre_ping=True,
        pool_recycle=300,
        # Error messages must never carry query parameters (password hashes, tokens).
        hide_parameters=True,
        connect_args={"connect_timeout": 3, "application_name": "maof"},
    )


@functools.lru_cache(maxsize=1)
def _session_factory() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on error."""
    ensure_migrated()
    session = _session_factory()()
    try:
        with session.begin():
            yield session
    finally:
        session.close()


R = TypeVar("R")


def insert_unique(row: R, conflict: errors.Conflict) -> R:
    """Insert `row` and read back its defaults; a unique-key violation raises `conflict`."""
    try:
        with session_scope() as session:
            session.add(row)
            session.flush()
            session.refresh(row)
    except IntegrityError:
        raise conflict from None
    return row


class SchemaNotMigrated(Exception):
    pass


_migrated = False


def schema_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        exists = conn.execute(text("SELECT to_regclass('public.alembic_version')")).scalar()
        if exists is None:
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def check_migrated() -> None:
    """Raise SchemaNotMigrated with a one-line reason unless the schema is current."""
    revision = schema_revision(get_engine())
    if revision != SCHEMA_REVISION:
        found = revision or "no schema"
        raise SchemaNotMigrated(
            f"database is at {found!s}, this code needs {SCHEMA_REVISION}: run `make migrate`"
        )


def ensure_migrated() -> None:
    """Check the schema once per process; refuse to work on an unmigrated database."""
    global _migrated
    if _migrated:
        return
    try:
        check_migrated()
    except SchemaNotMigrated as exc:
        raise errors.ServiceUnavailable(str(exc)) from None
    _migrated = True


def reset() -> None:
    """Drop pooled connections and cached state (tests switch databases)."""
    global _migrated
    _migrated = False
    if get_engine.cache_info().currsize:
        get_engine().dispose()
    get_engine.cache_clear()
    _session_factory.cache_clear()
