"""Test settings: a separate database, Redis db, queue and bucket, so tests never touch dev data."""

from __future__ import annotations

import os
import tempfile
from urllib.parse import urlparse, urlunparse

# MAOF_TEST_SUFFIX lets two test sessions share one stack without touching each other's
# database, queue or Redis db (e.g. MAOF_TEST_SUFFIX=b MAOF_TEST_REDIS_DB=14). Each worker
# of pytest-xdist (`make test` runs two) is such a session: its name (gw0, gw1, ...) joins
# the suffix, and it takes the Redis db that many below MAOF_TEST_REDIS_DB (15, 14, ...).
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
SUFFIX = os.environ.get("MAOF_TEST_SUFFIX", "") + WORKER
REDIS_DB = int(os.environ.get("MAOF_TEST_REDIS_DB", "15")) - int(WORKER[2:] or 0)
TEST_DATABASE_NAME = f"maof_test{'_' + SUFFIX if SUFFIX else ''}"
# Two roles, as everywhere: the application's (INSERT and SELECT only on the audit trail)
# and the owner's, which creates the test database and runs the migrations.
_app_db = os.environ.get(
    "MAOF_DATABASE_URL", "postgresql+psycopg://maof_app:maof_app@127.0.0.1:5432/maof"
)
_owner_db = os.environ.get(
    "MAOF_MIGRATION_DATABASE_URL",
    _app_db
    if "MAOF_DATABASE_URL" in os.environ
    else "postgresql+psycopg://maof:maof@127.0.0.1:5432/maof",
)
TEST_DATABASE_URL = urlunparse(urlparse(_app_db)._replace(path=f"/{TEST_DATABASE_NAME}"))
OWNER_DATABASE_URL = urlunparse(urlparse(_owner_db)._replace(path=f"/{TEST_DATABASE_NAME}"))
ADMIN_DATABASE_URL = urlunparse(urlparse(_owner_db)._replace(path="/postgres"))
_redis = urlparse(os.environ.get("MAOF_REDIS_URL", "redis://127.0.0.1:6379/0"))

os.environ.update(
    {
        "MAOF_STAGE": "test",
        "MAOF_DATABASE_URL": TEST_DATABASE_URL,
        "MAOF_MIGRATION_DATABASE_URL": OWNER_DATABASE_URL,
        # A signing key of the session's own (written below).
        "MAOF_AUDIT_KEYS_FILE": os.path.join(
            tempfile.mkdtemp(prefix="maof-test-keys-"), "audit-signing-keys.json"
        ),
        "MAOF_AUDIT_BUCKET": f"maof-test{SUFFIX}-audit",
        "MAOF_REDIS_URL": urlunparse(_redis._replace(path=f"/{REDIS_DB}")),
        "MAOF_STAGE_QUEUE_NAME": f"maof-test{SUFFIX}-stage-queue",
        "MAOF_DASHBOARD_BUCKET": f"maof-test{SUFFIX}-dashboard",
        "MAOF_LOG_LEVEL": os.environ.get("MAOF_TEST_LOG_LEVEL", "WARNING"),
        "MAOF_MOCK_AGENT_DELAY_MS": "0",
        "MAOF_MOCK_AGENT_FAILURE_RATE": "0",
        # Every test signs in and submits from 127.0.0.1 as a fresh user: the per-address
        # and per-user limits are raised here; their own tests lower them.
        "MAOF_LOGIN_ATTEMPTS_PER_IP_PER_MINUTE": "1000000",
        "MAOF_REGISTRATIONS_PER_IP_PER_HOUR": "1000000",
        "MAOF_SUBMISSIONS_PER_MINUTE": "1000000",
        # EMF metric lines go to standard output, which tests of the CLI read: off, except
        # in the tests of the metrics themselves (tests/integration/test_observability.py).
        "POWERTOOLS_METRICS_DISABLED": "true",
        # Test agents listen on 127.0.0.1; the SSRF guard's own tests switch this off.
        "MAOF_ALLOW_PRIVATE_AGENT_ENDPOINTS": "true",
    }
)
os.environ.pop("MAOF_STAGE_QUEUE_URL", None)
os.environ.pop("MAOF_AUDIT_SIGNING_KEYS", None)


def _write_key_set() -> None:
    """The session's key set, made a day ago: signing began then, as it did long before a
    deployment's runs (an unsigned entry logged since is refused: audit/verify.py)."""
    import json
    from datetime import UTC, datetime, timedelta

    from chalicelib.audit import keys

    made = (datetime.now(UTC) - timedelta(days=1)).isoformat(timespec="seconds")
    path = os.environ["MAOF_AUDIT_KEYS_FILE"]
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
        handle.write(json.dumps({"keys": [keys.new_jwk(made.replace("+00:00", "Z"))]}))


_write_key_set()
