"""Integration fixtures: the real local stack (Postgres, Redis, LocalStack), a fresh test
database, the API served over HTTP by the local Chalice server, and the SQS poller."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import boto3
import pytest
import requests
from sqlalchemy import create_engine, text

from chalicelib import aws, cache, db
from chalicelib.config import (
    SSM_MIGRATION_SECRETS,
    SSM_PREVIOUS_KEYS,
    SSM_SECRETS,
    get_settings,
    reset_settings,
)
from infra.secrets import parameter_name
from tests.conftest import (
    ADMIN_DATABASE_URL,
    OWNER_DATABASE_URL,
    TEST_DATABASE_NAME,
    TEST_DATABASE_URL,
)
from tests.support.agents import ScriptedAgent
from tests.support.openapi import check_answer


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(condition: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value: {value!r})")
        time.sleep(interval)


# tests/browser/conftest.py imports these fixtures, so pytest keeps a second instance of each
# session fixture for that folder, and under xdist a worker may run browser files between
# integration ones: the test database is made once per session (process). Made again, it
# dropped what the other instances still held (the admin account admin_uuid names).
_stack_made: list[bool] = []


@pytest.fixture(scope="session", autouse=True)
def stack() -> Iterator[None]:
    """A fresh, migrated test database and the test queue and bucket."""
    if _stack_made:  # the second instance (see _stack_made)
        yield
        return
    reset_settings()
    settings = get_settings()
    for name, url, default in (
        ("Postgres", settings.database_url, 5432),
        ("Redis", settings.redis_url, 6379),
        ("LocalStack", settings.aws_endpoint_url or "", 4566),
    ):
        parsed = urlparse_host(url, default)
        if not _port_open(*parsed):
            pytest.exit(f"{name} is not answering at {url}: start the stack with `make stack`", 2)
    admin = create_engine(ADMIN_DATABASE_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {TEST_DATABASE_NAME} WITH (FORCE)"))
        conn.execute(text(f"CREATE DATABASE {TEST_DATABASE_NAME}"))
    admin.dispose()
    assert TEST_DATABASE_URL.endswith(f"/{TEST_DATABASE_NAME}")
    db.reset()
    from chalicelib.db.migrate import upgrade

    upgrade()
    from devstack.stack import ensure_resources

    aws.reset()
    ensure_resources(settings)
    aws.aws_client("sqs").purge_queue(QueueUrl=aws.stage_queue_url())
    cache.reset()
    cache.get_redis().flushdb()
    _stack_made.append(True)
    yield
    db.reset()


@contextmanager
def owner_connection() -> Iterator[Any]:
    """A transaction as the database's owner (MAOF_MIGRATION_DATABASE_URL): what an
    administrator, not the application, could do to the test database."""
    engine = create_engine(OWNER_DATABASE_URL)
    try:
        with engine.begin() as conn:
            yield conn
    finally:
        engine.dispose()


def admin_sql(statement: str) -> None:
    """One statement as the server's superuser, outside any transaction (ALTER DATABASE)."""
    engine = create_engine(ADMIN_DATABASE_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(statement))
    finally:
        engine.dispose()


def set_read_only(on: bool) -> None:
    """The test database's new sessions read only (`on`: a failover to a reader) or
    writable again; sessions already open keep what they had."""
    value = (
        "SET default_transaction_read_only = on" if on else "RESET default_transaction_read_only"
    )
    admin_sql(f"ALTER DATABASE {TEST_DATABASE_NAME} {value}")


def end_app_sessions() -> None:
    """End every session of the app on the test database, as a failover does, and empty
    the app's pool: its next connection is a new session."""
    role = urlparse(TEST_DATABASE_URL).username
    admin_sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE datname = '{TEST_DATABASE_NAME}' AND usename = '{role}'"
    )
    db.get_engine().dispose()


@pytest.fixture
def read_only_database() -> Iterator[None]:
    """A failover to a read-only node for the test's length: every session the app opens
    is read only; after it, writable again and every session new."""
    set_read_only(True)
    end_app_sessions()
    try:
        yield
    finally:
        set_read_only(False)
        end_app_sessions()


def restore_secret_key(monkeypatch: pytest.MonkeyPatch, used: str, rotated_to: str) -> None:
    """After a test rotated MAOF_SECRET_KEY from `used` to `rotated_to`: every secret of the
    session's database back under the key the other tests use, and the settings as before."""
    from chalicelib.agents.secrets import reencrypt_all

    monkeypatch.setenv("MAOF_SECRET_KEY", used)
    monkeypatch.setenv("MAOF_PREVIOUS_SECRET_KEYS", rotated_to)
    reset_settings()
    reencrypt_all()
    monkeypatch.undo()
    reset_settings()


@pytest.fixture
def nothing_else_stalled() -> None:
    """Stages other tests left queued (no worker ran them) stall too, and the sweeper takes
    the longest stalled first, up to its batch: behind hundreds of them (a test submitting
    many runs earlier in the session), the stage a test made stall only a few seconds ago
    was not swept. They are made due just now, out of this test's way: queued and waiting
    ones queued just now, leases left to expire by workers a test stopped renewed."""
    with db.session_scope() as session:
        session.execute(
            text(
                "UPDATE stage_executions SET queued_at = now(), not_before = NULL "
                "WHERE status IN ('queued', 'waiting')"
            )
        )
        session.execute(
            text(
                "UPDATE stage_executions SET lease_expires_at = now() + interval '1 hour' "
                "WHERE status = 'in_progress' AND lease_expires_at <= now()"
            )
        )


def urlparse_host(url: str, default_port: int) -> tuple[str, int]:
    from urllib.parse import urlparse

    parsed = urlparse(url.replace("+psycopg", ""))
    return parsed.hostname or "127.0.0.1", parsed.port or default_port


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def api_url(stack: None) -> Iterator[str]:
    """The API over real HTTP: MAOF's `chalice local` server in a background thread."""
    from devstack.api import create_server

    port = free_port()
    server = create_server("127.0.0.1", port, stage="dev")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _port_open("127.0.0.1", port), timeout=10)
    yield url
    server.shutdown()


@dataclass
class Api:
    """A small HTTP client for the API; `token` is sent as a bearer token when set."""

    base_url: str
    token: str | None = None
    user: dict[str, Any] | None = None

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """The answer, checked against /openapi (tests/support/openapi.py)."""
        headers = dict(kwargs.pop("headers", {}) or {})
        if self.token and "Authorization" not in headers:
            headers["Authorization"] = f"Bearer {self.token}"
        response = requests.request(
            method, self.base_url + path, headers=headers, timeout=10, **kwargs
        )
        check_answer(response)
        return response

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, json: Any = None, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, json=json, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("DELETE", path, **kwargs)

    def as_new_user(self, password: str = "correct-horse-battery") -> Api:
        """A client signed in as a freshly registered user."""
        email = unique_email()
        created = self.post(
            "/auth/register", {"email": email, "password": password, "name": "Test"}
        )
        assert created.status_code == 201, created.text
        login = self.post("/auth/login", {"email": email, "password": password})
        assert login.status_code == 200, login.text
        data = login.json()["data"]
        return Api(self.base_url, token=data["accessToken"], user=data["user"])


def unique_email() -> str:
    return f"user-{uuid.uuid4().hex[:12]}@example.com"


@pytest.fixture
def api(api_url: str) -> Api:
    """An anonymous client."""
    return Api(api_url)


@pytest.fixture
def user(api: Api) -> Api:
    """A client signed in as a new user."""
    return api.as_new_user()


class SentMessages:
    """Stands in for SQS sends so a test decides exactly what gets delivered."""

    def __init__(self) -> None:
        self.sent: list[tuple[uuid.UUID, str]] = []
        self._lock = threading.Lock()

    def __call__(self, run_id: uuid.UUID, stage_ids: list[str], *_: Any, **__: Any) -> None:
        with self._lock:
            self.sent.extend((run_id, s) for s in stage_ids)


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Iterator[SentMessages]:
    """Every stage goes through the (recorded) queue: eager dispatch off, so a test that
    delivers messages by hand decides every hop, including the stages a completion makes
    ready (test_delivery.py's eager dispatch tests have them run where they complete)."""
    monkeypatch.setenv("MAOF_EAGER_DISPATCH", "false")
    reset_settings()
    recorder = SentMessages()
    from chalicelib.engine import handlers
    from chalicelib.workflows import runs

    monkeypatch.setattr(runs, "send_stage_messages", recorder)
    monkeypatch.setattr(handlers, "send_stage_messages", recorder)
    yield recorder
    monkeypatch.undo()
    reset_settings()


@pytest.fixture
def agents() -> Iterator[list[ScriptedAgent]]:
    """ScriptedAgents a test starts (tests.support.agents.start_agent), stopped after it."""
    started: list[ScriptedAgent] = []
    yield started
    for agent in started:
        agent.stop()


ADMIN_EMAIL = "admin@example.com"
ADMIN_PASSWORD = "admin-password-123"


def name_admins(*user_uuids: str) -> None:
    """MAOF_ADMIN_USER_UUIDS for the in-process API, from now on."""
    os.environ["MAOF_ADMIN_USER_UUIDS"] = ",".join(user_uuids)
    reset_settings()


@pytest.fixture(scope="session")
def admin_uuid(api_url: str) -> str:
    """The admin's account, registered once per test session."""
    credentials = {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}
    body = credentials | {"name": "Admin"}
    created = requests.post(f"{api_url}/auth/register", json=body, timeout=30)
    if created.status_code == 201:
        return str(created.json()["data"]["userUuid"])
    signed_in = requests.post(f"{api_url}/auth/login", json=credentials, timeout=30)
    assert signed_in.status_code == 200, signed_in.text
    return str(signed_in.json()["data"]["user"]["userUuid"])


# The admin's sign-in, kept for the session while it stays valid: signing in for every test
# passed the per-account limit (MAOF_LOGIN_ATTEMPTS_PER_MINUTE) when a few tests using the
# admin ran within a minute. Admin rights are read from the settings at each request.
_admin_sign_in: dict[str, Any] = {}


@pytest.fixture
def admin(api: Api, admin_uuid: str) -> Api:
    """A client signed in as the admin, named by its UUID (as an operator does)."""
    name_admins(admin_uuid)
    data = _admin_sign_in.get("data")
    if (
        data is None
        or Api(api.base_url, token=data["accessToken"]).get("/auth/me").status_code != 200
    ):
        login = api.post("/auth/login", {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
        assert login.status_code == 200, login.text
        data = _admin_sign_in["data"] = login.json()["data"]
    assert data["user"]["role"] == "admin"
    return Api(api.base_url, token=data["accessToken"], user=data["user"])


@pytest.fixture(scope="session")
def poller(stack: None) -> Iterator[Any]:
    """The local SQS event source, invoking the app's run_stage handler (4 workers)."""
    import app as maof
    from devstack.poller import Poller

    running = Poller(maof.app.handler_map["run_stage"], concurrency=4, wait_seconds=1).start()
    yield running
    running.stop()


def register_agent(client: Api, capability: str, **fields: Any) -> dict[str, Any]:
    """Register an agent with one capability, served by the built-in mock unless an
    `endpoint` is given; returns the agent."""
    body = {
        "agentId": f"agent-{uuid.uuid4().hex[:10]}",
        "name": f"{capability} agent",
        "endpoint": "mock://test-agent",
        "authToken": "agent-secret-token",
        "capabilities": [capability],
        **fields,
    }
    response = client.post("/agents/register", body)
    assert response.status_code == 201, response.text
    return dict(response.json()["data"])


def wait_for_run(client: Api, run_id: str, timeout: float = 30.0) -> dict[str, Any]:
    """Poll the run until it has ended (completed, failed or cancelled); return its detail."""

    def finished() -> dict[str, Any] | None:
        data = client.get(f"/workflows/{run_id}").json()["data"]
        return data if data["status"] in ("completed", "failed", "cancelled") else None

    return dict(wait_until(finished, timeout=timeout, interval=0.1))


def unique_capability(prefix: str = "cap") -> str:
    """A capability no other test registers, so tests don't share agents."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------ SSM (LocalStack's)

SSM_DATABASE_URL = "postgresql://maof_app:s3cret@db.internal:5432/maof?sslmode=require"
SSM_MIGRATION_DATABASE_URL = "postgresql://maof:0wner@db.internal:5432/maof?sslmode=require"
SSM_REDIS_URL = "rediss://:token@cache.internal:6379/0"


def localstack_endpoint() -> str:
    return get_settings().aws_endpoint_url or "http://127.0.0.1:4566"


@pytest.fixture(scope="module")
def ssm() -> Any:
    return boto3.client(
        "ssm",
        endpoint_url=localstack_endpoint(),
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )


@pytest.fixture
def ssm_path(ssm: Any) -> Iterator[str]:
    """A path of its own, emptied afterwards."""
    path = f"/maof-test/secrets-{uuid.uuid4().hex[:10]}"
    yield path
    names = [*SSM_SECRETS, *SSM_PREVIOUS_KEYS, *SSM_MIGRATION_SECRETS]
    ssm.delete_parameters(Names=[parameter_name(path, name) for name in names])


@pytest.fixture
def ssm_prod(monkeypatch: pytest.MonkeyPatch, ssm_path: str) -> Iterator[pytest.MonkeyPatch]:
    """A prod API process whose only secret setting is the SSM path (LocalStack standing
    in); without MAOF_TOKEN_ISSUER, the other functions'."""
    endpoint = localstack_endpoint()
    monkeypatch.setenv("MAOF_STAGE", "prod")
    monkeypatch.setenv("MAOF_TOKEN_ISSUER", "true")
    monkeypatch.setenv("MAOF_SECRETS_SSM_PATH", ssm_path)
    monkeypatch.setenv("MAOF_AWS_ENDPOINT_URL", endpoint)
    for name in SSM_SECRETS.values():
        monkeypatch.delenv(name, raising=False)
    reset_settings()
    yield monkeypatch
    reset_settings()
