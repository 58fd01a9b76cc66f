"""Database access: one engine per process, one session per unit of work."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    IntegrityError,
    InterfaceError,
    OperationalError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from chalicelib.config import get_settings
from chalicelib.core import errors

# The Alembic revision this code expects; tests check it is the migrations' head.
SCHEMA_REVISION = "0014_forget_secrets"


def _psycopg_url(url: str) -> str:
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


# A pooled connection idle longer than this is pinged before use (a frozen Lambda, a
# restarted server); one in steady use is not, which saves a round trip per transaction.
PING_AFTER_IDLE_SECONDS = 1.0


# A peer gone without closing (a killed or frozen host, a partition) is noticed within a
# minute on either end, not after the OS's two hours: on the server's, its session ends
# and takes its locks along (the checkpointer's advisory lock is held between
# transactions, where no idle-in-transaction timeout applies).
KEEPALIVES = {"idle": 30, "interval": 10, "count": 3}


def connect_args(
    idle_in_transaction_seconds: int, lock_timeout_ms: int = 0, statement_timeout_ms: int = 0
) -> dict[str, Any]:
    """libpq's connection parameters for the application's connections; a timeout of 0 is
    not sent (nor, with the first, the server's keepalives)."""
    args: dict[str, Any] = {"connect_timeout": 3, "application_name": "maof", "keepalives": 1}
    args.update({f"keepalives_{name}": value for name, value in KEEPALIVES.items()})
    options = []
    if idle_in_transaction_seconds:
        # A worker that hangs mid-transaction (a stalled host, a partition) would hold its
        # run's lock, and stall every other worker of the run, until its dead connection
        # timed out (hours): Postgres ends the session after this instead.
        ms = idle_in_transaction_seconds * 1000
        options.append(f"-c idle_in_transaction_session_timeout={ms}")
        options.extend(f"-c tcp_keepalives_{k}={v}" for k, v in KEEPALIVES.items())
    # The API's: a request waiting on a lock that such a worker holds, or on a statement,
    # is answered 503 within API Gateway's 29 s instead of a 504 that still holds the
    # function (Postgres raises LockNotAvailable or QueryCanceled: an OperationalError).
    if lock_timeout_ms:
        options.append(f"-c lock_timeout={lock_timeout_ms}")
    if statement_timeout_ms:
        options.append(f"-c statement_timeout={statement_timeout_ms}")
    if options:
        args["options"] = " ".join(options)
    return args


# read_only_sql_transaction: the session is on a node that takes no writes (a failover's
# reader, or the database set read only).
READ_ONLY_SQLSTATE = "25006"
# SQLSTATEs psycopg raises as errors other than OperationalError that mean the session, not
# the statement, is the trouble: a read-only node, and a session the server ended for
# idling in a transaction (idle_in_transaction_session_timeout).
UNAVAILABLE_SQLSTATES = frozenset({READ_ONLY_SQLSTATE, "25P03"})


def is_unavailable(exc: BaseException) -> bool:
    """Whether `exc` means the database is away or not writable right now (a lost or
    refused connection, a server shutting down, a deadlock or a cancelled statement, a
    read-only node, no pooled connection free in time): not the work's fault, and the same
    work may succeed shortly. Anything else is a fault of the work itself."""
    if isinstance(exc, OperationalError | InterfaceError | DisconnectionError | PoolTimeout):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    return exc.connection_invalidated or (
        getattr(exc.orig, "sqlstate", None) in UNAVAILABLE_SQLSTATES
    )


# The longest the API waits for a pooled connection (every one held, by requests waiting
# on locks, say) before answering 503: well within API Gateway's 29 s. The workers wait
# SQLAlchemy's 30 s (a PoolTimeout hands their message back uncounted).
API_POOL_TIMEOUT_SECONDS = 5.0
WORKER_POOL_TIMEOUT_SECONDS = 30.0


def pool_timeout(lock_timeout_ms: int) -> float:
    """The API's connections are those with a lock timeout (.chalice/config.json and make
    dev's API server set it for the API alone)."""
    return API_POOL_TIMEOUT_SECONDS if lock_timeout_ms else WORKER_POOL_TIMEOUT_SECONDS


@functools.lru_cache(maxsize=1)
def get_engine() -> Engine:
    settings = get_settings()
    engine = create_engine(
        _psycopg_url(settings.database_url),
        # Kept open between uses: a run_stage execution works up to 10 records at once
        # (opening a connection costs far more than a stage's transaction). Beyond the
        # pool, overflow connections (the local poller runs several executions in one
        # process), closed when returned. Deployed, each function sets its own
        # (.chalice/config.json): the API and the schedules need few.
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        # The most recently used connection first: the busy ones stay warm (no ping),
        # the spare ones age out through pool_recycle.
        pool_use_lifo=True,
        pool_recycle=300,
        pool_timeout=pool_timeout(settings.db_lock_timeout_ms),
        # Error messages must never carry query parameters (password hashes, tokens).
        hide_parameters=True,
        connect_args=connect_args(
            settings.db_idle_in_transaction_seconds,
            settings.db_lock_timeout_ms,
            settings.db_statement_timeout_ms,
        ),
    )
    dialect = engine.dialect

    def ping_if_idle(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        """Pre-ping, for connections that sat idle: a dead one is replaced (the pool
        retries the checkout with a new connection) rather than failing the caller."""
        idle_since = record.info.get("maof_idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_SECONDS:
            return  # fresh from connect(), or in steady use
        try:
            dialect.do_ping(dbapi_connection)
        except Exception as exc:
            raise DisconnectionError(f"pre-ping failed: {type(exc).__name__}") from None

    event.listen(engine, "checkin", _stamp_checkin)
    event.listen(engine, "checkout", ping_if_idle)
    event.listen(engine, "handle_error", _read_only_is_a_disconnect)
    return engine


def _read_only_is_a_disconnect(context: ExceptionContext) -> None:
    """A connection that finds itself on a read-only node is dropped, and the pool's others
    with it: opened during a failover, they pass the pre-ping, and kept failing every write
    after the primary was back until pool_recycle (300 s). Their replacements connect to
    wherever the database's address points now."""
    if getattr(context.original_exception, "sqlstate", None) == READ_ONLY_SQLSTATE:
        context.is_disconnect = True


def _stamp_checkin(dbapi_connection: Any, record: Any) -> None:
    record.info["maof_idle_since"] = time.monotonic()


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


@contextmanager
def autocommit_connection() -> Iterator[Connection]:
    """A pooled connection on which each statement is its own transaction: one round trip
    for a statement that does its whole unit of work (no BEGIN, no COMMIT)."""
    ensure_migrated()
    with get_engine().connect() as conn:
        yield conn.execution_options(isolation_level="AUTOCOMMIT")


R = TypeVar("R")


def insert_unique(
    row: R, conflict: errors.Conflict, check: Callable[[Session], None] | None = None
) -> R:
    """Insert `row` and read back its defaults; a unique-key violation raises `conflict`.
    `check` runs first in the same transaction (a quota, say), and may raise."""
    try:
        with session_scope() as session:
            if check is not None:
                check(session)
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
