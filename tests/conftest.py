"""Test settings: a separate database, Redis db, queue and bucket, so tests never touch dev data."""

from __future__ import annotations

import os
from urllib.parse import urlparse, urlunparse

_dev_db = os.environ.get("MAOF_DATABASE_URL", "postgresql+psycopg://maof:maof@127.0.0.1:5432/maof")
_parsed = urlparse(_dev_db)
TEST_DATABASE_URL = urlunparse(_parsed._replace(path="/maof_test"))
ADMIN_DATABASE_URL = urlunparse(_parsed._replace(path="/postgres"))
_redis = urlparse(os.environ.get("MAOF_REDIS_URL", "redis://127.0.0.1:6379/0"))

os.environ.update(
    {
        "MAOF_STAGE": "test",
        "MAOF_DATABASE_URL": TEST_DATABASE_URL,
        "MAOF_REDIS_URL": urlunparse(_redis._replace(path="/15")),
        "MAOF_STAGE_QUEUE_NAME": "maof-test-stage-queue",
        "MAOF_DASHBOARD_BUCKET": "maof-test-dashboard",
        "MAOF_LOG_LEVEL": os.environ.get("MAOF_TEST_LOG_LEVEL", "WARNING"),
        "MAOF_MOCK_AGENT_DELAY_MS": "0",
        "MAOF_MOCK_AGENT_FAILURE_RATE": "0",
    }
)
os.environ.pop("MAOF_STAGE_QUEUE_URL", None)
