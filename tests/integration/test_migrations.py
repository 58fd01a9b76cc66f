"""The migrations themselves, on a database of their own: interrupted or run twice at once,
a later `make migrate` (or the migrate function) finishes the job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

import pytest
from alembic import command
from sqlalchemy import create_engine, text

from chalicelib import db
from chalicelib.config import reset_settings
from chalicelib.db import SCHEMA_REVISION
from chalicelib.db.migrate import alembic_config
from tests.conftest import (
    ADMIN_DATABASE_URL,
    OWNER_DATABASE_URL,
    TEST_DATABASE_NAME,
    TEST_DATABASE_URL,
)
from tests.integration.conftest import wait_until

pytestmark = pytest.mark.integration

NAME = f"{TEST_DATABASE_NAME}_mig"
PROJECT_DIR = Path(__file__).resolve().parents[2]


def _in(url: str, name: str) -> str:
    return urlunparse(urlparse(url)._replace(path=f"/{name}"))


class Database:
    """A database of the test's own, as its owner sees it."""

    def __init__(self) -> None:
        self.name = NAME
        self.app = _in(TEST_DATABASE_URL, NAME)
        self.owner = _in(OWNER_DATABASE_URL, NAME)

    def scalar(self, sql: str, **params: Any) -> Any:
        engine = create_engine(self.owner)
        try:
            with engine.begin() as conn:
                return conn.execute(text(sql), params).scalar()
        finally:
            engine.dispose()


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[Database]:
    """An empty database that the settings, the engine and the migrations point at."""
    admin = create_engine(ADMIN_DATABASE_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {NAME} WITH (FORCE)"))
        conn.execute(text(f"CREATE DATABASE {NAME}"))
    target = Database()
    monkeypatch.setenv("MAOF_DATABASE_URL", target.app)
    monkeypatch.setenv("MAOF_MIGRATION_DATABASE_URL", target.owner)
    reset_settings()
    db.reset()
    try:
        yield target
    finally:
        monkeypatch.undo()
        reset_settings()
        db.reset()  # back to the session's test database
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {NAME} WITH (FORCE)"))
        admin.dispose()


def _upgrade(revision: str = "head") -> None:
    command.upgrade(alembic_config(), revision)


def _backend(database: Database, query_like: str, waiting_on: str | None = None) -> int | None:
    """The pid of a session of `database` whose (last) query is like `query_like`, waiting
    on a lock of type `waiting_on` if given."""
    admin = create_engine(ADMIN_DATABASE_URL)
    try:
        with admin.connect() as conn:
            return conn.execute(
                text(
                    "SELECT pid FROM pg_stat_activity WHERE datname = :db AND query ILIKE :q "
                    "AND (CAST(:w AS text) IS NULL OR wait_event_type = :w)"
                ),
                {"db": database.name, "q": query_like, "w": waiting_on},
            ).scalar()
    finally:
        admin.dispose()


def test_a_migration_interrupted_in_a_concurrent_index_build_finishes_on_the_next_run(
    fresh: Database,
):
    _upgrade("0011_runs_by_end")
    # A writer with an open transaction on stage_executions (a stage completing while the
    # deploy migrates): CREATE INDEX CONCURRENTLY waits for it, and is cancelled there (the
    # migrate function's timeout, an operator's Ctrl-C), leaving an INVALID index behind.
    blocker_engine = create_engine(fresh.owner)
    blocker = blocker_engine.connect()
    blocker.execute(text("LOCK TABLE stage_executions IN ROW EXCLUSIVE MODE"))
    failures: list[BaseException] = []

    def migrate() -> None:
        try:
            _upgrade()
        except Exception as exc:  # the cancelled build's error, asserted below
            failures.append(exc)

    thread = threading.Thread(target=migrate)
    thread.start()
    admin = create_engine(ADMIN_DATABASE_URL, isolation_level="AUTOCOMMIT")
    try:
        pid = wait_until(lambda: _backend(fresh, "CREATE INDEX CONCURRENTLY%", "Lock"), timeout=20)
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_cancel_backend(:pid)"), {"pid": pid})
        thread.join(30)
    finally:
        blocker.rollback()
        blocker.close()
        blocker_engine.dispose()
        admin.dispose()
    assert not thread.is_alive()
    assert failures, "the interrupted migration reported its failure"
    assert fresh.scalar("SELECT version_num FROM alembic_version") == "0011_runs_by_end"
    assert fresh.scalar(
        "SELECT NOT indisvalid FROM pg_index WHERE indexrelid = 'stage_executions_on_agent'::regclass"
    ), "the cancelled build left an invalid index (the case under test)"

    _upgrade()  # the next deploy's migration

    assert fresh.scalar("SELECT version_num FROM alembic_version") == SCHEMA_REVISION
    assert fresh.scalar(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = 'stage_executions_on_agent'::regclass"
    ), "the index the code relies on is valid"
    assert fresh.scalar("SELECT count(*) FROM pg_index WHERE NOT indisvalid") == 0


def test_an_index_built_before_its_revision_was_stamped_is_kept(fresh: Database):
    """The build finished but the process died before Alembic recorded the revision."""
    _upgrade("0011_runs_by_end")
    engine = create_engine(fresh.owner, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(
                text(
                    "CREATE INDEX CONCURRENTLY stage_executions_on_agent ON stage_executions "
                    "(agent_uuid) WHERE status = 'in_progress'"
                )
            )
    finally:
        engine.dispose()
    _upgrade()
    assert fresh.scalar("SELECT version_num FROM alembic_version") == SCHEMA_REVISION


# The second migration: `make migrate`, or the migrate function (whose answer once gave the
# revision read before it waited: the second said it migrated, from what the first found).
SECOND_MIGRATIONS = {
    "make migrate": (["-m", "chalicelib.db.migrate"], "maof: database migrated to head"),
    "the migrate function": (
        [
            "-c",
            "import json; from chalicelib import maintenance; print(json.dumps(maintenance.handler()))",
        ],
        json.dumps(
            {"migrated": False, "fromRevision": SCHEMA_REVISION, "toRevision": SCHEMA_REVISION}
        ),
    ),
}


@pytest.mark.parametrize("second_by", list(SECOND_MIGRATIONS))
def test_a_second_migration_waits_for_the_first_then_has_nothing_to_do(
    fresh: Database, second_by: str
):
    """Two migrations at once (the migrate function invoked twice, `make migrate` during a
    deploy) raced each other and the second failed with a raw database error."""
    args, last_line = SECOND_MIGRATIONS[second_by]
    _upgrade("0011_runs_by_end")
    # The first migration is held in its index build by a writer's open transaction.
    blocker_engine = create_engine(fresh.owner)
    blocker = blocker_engine.connect()
    blocker.execute(text("LOCK TABLE stage_executions IN ROW EXCLUSIVE MODE"))
    failures: list[BaseException] = []

    def first() -> None:
        try:
            _upgrade()
        except Exception as exc:  # asserted below
            failures.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    second, lines = None, []
    try:
        wait_until(lambda: _backend(fresh, "CREATE INDEX CONCURRENTLY%", "Lock"), timeout=20)
        env = dict(
            os.environ,
            MAOF_DATABASE_URL=fresh.app,
            MAOF_MIGRATION_DATABASE_URL=fresh.owner,
            MAOF_LOG_LEVEL="INFO",
        )
        second = subprocess.Popen(
            [sys.executable, *args],
            env=env,
            cwd=str(PROJECT_DIR),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        reader = threading.Thread(target=lambda: lines.extend(second.stdout or []), daemon=True)
        reader.start()
        # The second waits for the first's migration lock (not for the table, or failing).
        wait_until(lambda: any("another migration is running" in line for line in lines))
    finally:
        blocker.rollback()
        blocker.close()
        blocker_engine.dispose()
        thread.join(60)
        if second is not None:
            second.wait(60)
            reader.join(10)
    output = "".join(lines)
    assert failures == []
    assert second.returncode == 0, output
    assert output.strip().splitlines()[-1] == last_line
    assert fresh.scalar("SELECT version_num FROM alembic_version") == SCHEMA_REVISION
    assert fresh.scalar("SELECT count(*) FROM pg_index WHERE NOT indisvalid") == 0


def test_secrets_nothing_will_use_again_are_cleared_by_the_migration(fresh: Database):
    """Before 0014 a deleted agent kept its token, and a completed run whose callback was
    delivered or given up kept its secret; the migration clears those it finds, and only
    those (a live agent calls with its token; a pending callback, or a failed or cancelled
    run's that a retry re-arms, signs with its secret)."""
    _upgrade("0013_waiting_runs")
    user = fresh.scalar(
        "INSERT INTO users (email, password_hash, name) VALUES ('m@example.com', 'x', 'M') "
        "RETURNING id"
    )
    tokens = {
        deleted: fresh.scalar(
            "INSERT INTO agents (agent_id, owner_id, name, endpoint, auth_token_encrypted, "
            "capabilities, deleted_at) VALUES (:a, :u, 'A', 'mock://a', 'token', ARRAY['c'], "
            "CASE WHEN :deleted THEN now() END) RETURNING id",
            a=f"agent-{deleted}",
            u=user,
            deleted=deleted,
        )
        for deleted in (True, False)
    }
    runs = {
        (status, state): fresh.scalar(
            "INSERT INTO workflow_runs (user_id, workflow_name, definition, status, "
            "callback_url, callback_secret_encrypted, callback_state) VALUES (:u, 'w', "
            "'{}', :status, 'https://example.com/hook', 'secret', :state) RETURNING id",
            u=user,
            status=status,
            state=state,
        )
        for status, state in [
            ("completed", "delivered"),
            ("completed", "failed"),
            ("completed", "pending"),
            ("failed", "delivered"),
            ("cancelled", "failed"),
        ]
    }

    _upgrade()

    def token(agent: Any) -> Any:
        return fresh.scalar("SELECT auth_token_encrypted FROM agents WHERE id = :i", i=agent)

    def secret(run: Any) -> Any:
        return fresh.scalar(
            "SELECT callback_secret_encrypted FROM workflow_runs WHERE id = :i", i=run
        )

    assert {deleted: token(agent) for deleted, agent in tokens.items()} == {
        True: None,
        False: "token",
    }
    assert {key: secret(run) for key, run in runs.items()} == {
        ("completed", "delivered"): None,
        ("completed", "failed"): None,
        ("completed", "pending"): "secret",
        ("failed", "delivered"): "secret",
        ("cancelled", "failed"): "secret",
    }
