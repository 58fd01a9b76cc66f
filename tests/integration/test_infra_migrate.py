"""The `migrate` Lambda function, invoked in process through Chalice's test client.

With the prod stage's configuration from .chalice/config.json and nothing secret in the
environment (the JWT secret, the key and the database URL come from SSM Parameter Store,
LocalStack's here), it migrates a fresh database to the revision the code expects — what
`make deploy` asks of the deployed function after each stack update.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

import boto3
import pytest
from alembic.script import ScriptDirectory
from chalice.test import Client
from sqlalchemy import create_engine, text

from chalicelib import db
from chalicelib.config import get_settings, reset_settings
from chalicelib.db import SCHEMA_REVISION
from chalicelib.db.migrate import SCRIPT_LOCATION, alembic_config
from chalicelib.maintenance import REENCRYPT
from infra.secrets import all_parameters, ensure_secrets, parameter_name
from tests.conftest import (
    ADMIN_DATABASE_URL,
    OWNER_DATABASE_URL,
    TEST_DATABASE_NAME,
    TEST_DATABASE_URL,
)

pytestmark = pytest.mark.integration

PROJECT_DIR = Path(__file__).resolve().parents[2]


def test_the_migrations_live_in_the_package_and_end_where_the_code_expects() -> None:
    assert SCRIPT_LOCATION == PROJECT_DIR / "chalicelib" / "db" / "migrations"
    stray = sorted(p.name for p in (PROJECT_DIR / "migrations").rglob("*.py"))
    assert stray == [], "version scripts go in chalicelib/db/migrations/versions (zipped)"
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head == SCHEMA_REVISION


@pytest.fixture
def fresh_database() -> Iterator[str]:
    """The URL of a new, empty database, dropped afterwards."""
    name = f"{TEST_DATABASE_NAME}_migrate"
    admin = create_engine(ADMIN_DATABASE_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        conn.execute(text(f"CREATE DATABASE {name}"))
    yield urlunparse(urlparse(TEST_DATABASE_URL)._replace(path=f"/{name}"))
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


def _ssm(endpoint: str) -> Any:
    return boto3.client(
        "ssm",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )


@pytest.fixture
def prod_secrets(fresh_database: str) -> Iterator[tuple[str, str]]:
    """SSM parameters for a prod stage whose database-url is the fresh database."""
    endpoint = get_settings().aws_endpoint_url or "http://127.0.0.1:4566"
    ssm = _ssm(endpoint)
    path = f"/maof-test/migrate-{uuid.uuid4().hex[:10]}"
    owner = urlunparse(urlparse(OWNER_DATABASE_URL)._replace(path=urlparse(fresh_database).path))
    urls = {
        "database-url": fresh_database,
        "migration-database-url": owner,
        "redis-url": get_settings().redis_url,
    }
    ensure_secrets(ssm, path, urls=urls)
    yield path, endpoint
    ssm.delete_parameters(Names=all_parameters(path))


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            query = text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            return set(conn.execute(query).scalars())
    finally:
        engine.dispose()


@pytest.fixture
def prod_environment(
    monkeypatch: pytest.MonkeyPatch, prod_secrets: tuple[str, str]
) -> Iterator[None]:
    """Nothing secret in the environment, the SSM path of `prod_secrets`: the prod stage's
    functions read their secrets from there, as deployed. Chalice's test client adds each
    function's own variables (.chalice/config.json) when it invokes it."""
    path, endpoint = prod_secrets
    monkeypatch.setenv("MAOF_SECRETS_SSM_PATH", path)
    monkeypatch.setenv("MAOF_AWS_ENDPOINT_URL", endpoint)  # LocalStack stands in for SSM
    for name in ("MAOF_JWT_SECRET", "MAOF_SECRET_KEY", "MAOF_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    # The local Postgres and Redis speak no TLS; everything else is the prod configuration.
    monkeypatch.setenv("MAOF_ALLOW_INSECURE_CONNECTIONS", "true")
    # MAOF_DATABASE_URL and MAOF_MIGRATION_DATABASE_URL still name the session's test
    # database: SSM's must win.
    reset_settings()
    db.reset()
    yield
    reset_settings()
    db.reset()  # back to the session's test database for the tests that follow


def test_migrate_function_migrates_a_fresh_database_with_the_prod_configuration(
    prod_environment: None, fresh_database: str
) -> None:
    import app as maof

    results: list[Any] = []
    with Client(maof.app, stage_name="prod", project_dir=str(PROJECT_DIR)) as client:
        for _ in range(2):
            results.append(client.lambda_.invoke("migrate", {}).payload)
            assert get_settings().stage == "prod"
            assert get_settings().database_url == fresh_database
    assert results == [
        {"migrated": True, "fromRevision": None, "toRevision": SCHEMA_REVISION},
        {"migrated": False, "fromRevision": SCHEMA_REVISION, "toRevision": SCHEMA_REVISION},
    ]
    assert {"users", "agents", "workflow_runs", "execution_logs"} <= _tables(fresh_database)
    # The application role (database-url's) was given its rights, and no more, on the trail.
    engine = create_engine(fresh_database)
    try:
        with engine.connect() as conn:
            rights = {
                right: conn.execute(
                    text("SELECT has_table_privilege('execution_logs', :right)"), {"right": right}
                ).scalar()
                for right in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE")
            }
    finally:
        engine.dispose()
    assert rights == {
        "SELECT": True,
        "INSERT": True,
        "UPDATE": False,
        "DELETE": False,
        "TRUNCATE": False,
    }


def test_the_migrate_function_upgrades_and_reencrypts_without_the_audit_signing_key(
    prod_environment: None, prod_secrets: tuple[str, str]
) -> None:
    """It alone reads the schema owner's URL, and the owner's role with the signing key can
    rewrite and re-sign a run not yet checkpointed (docs/audit.md): it signs nothing, so it
    does not read the key (MAOF_SECRETS_SSM_NAMES in .chalice/config.json; its role may
    not, test_package.py), though `make secrets` put it under the same path."""
    import app as maof

    path, endpoint = prod_secrets
    assert _ssm(endpoint).get_parameters(Names=[parameter_name(path, "audit-signing-key")])[
        "Parameters"
    ]
    with Client(maof.app, stage_name="prod", project_dir=str(PROJECT_DIR)) as client:
        migrated = client.lambda_.invoke("migrate", {}).payload
        reencrypted = client.lambda_.invoke("migrate", {"action": REENCRYPT}).payload
        settings = get_settings()
    assert migrated == {"migrated": True, "fromRevision": None, "toRevision": SCHEMA_REVISION}
    assert reencrypted == {"reencrypted": 0, "unreadable": 0}
    assert settings.migrator and settings.secret_key
    assert settings.audit_signing_keys is None
