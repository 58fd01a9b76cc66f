"""The benchmark's own corner of the local stack: database `maof_bench` (recreated and
migrated each run), Redis db 11, queue `maof-bench-stage-queue`. Nothing here touches dev
or test data. Two benchmarks sharing a stack must not share these (a run drops the
database, and each would consume the other's messages): MAOF_BENCH_DATABASE,
MAOF_BENCH_REDIS_DB and MAOF_BENCH_QUEUE name others.

`configure()` must run before anything reads chalicelib's settings.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse, urlunparse

BENCH_DATABASE = os.environ.get("MAOF_BENCH_DATABASE", "maof_bench")
BENCH_REDIS_DB = os.environ.get("MAOF_BENCH_REDIS_DB", "11")
BENCH_QUEUE = os.environ.get("MAOF_BENCH_QUEUE", "maof-bench-stage-queue")
BENCH_BUCKET = "maof-bench-dashboard"

_DEV_DATABASE_URL = "postgresql+psycopg://maof:maof@127.0.0.1:5432/maof"


def _database_urls() -> tuple[str, str, str]:
    """The bench database as the application and as its owner (who also creates it)."""
    base = urlparse(os.environ.get("MAOF_DATABASE_URL", _DEV_DATABASE_URL))
    owner = urlparse(os.environ.get("MAOF_MIGRATION_DATABASE_URL") or base.geturl())
    return (
        urlunparse(base._replace(path=f"/{BENCH_DATABASE}")),
        urlunparse(owner._replace(path=f"/{BENCH_DATABASE}")),
        urlunparse(owner._replace(path="/postgres")),
    )


BENCH_DATABASE_URL, BENCH_OWNER_DATABASE_URL, ADMIN_DATABASE_URL = _database_urls()


def bench_environ() -> dict[str, str]:
    """The MAOF_* settings every benchmark process (this one and its children) runs with."""
    redis = urlparse(os.environ.get("MAOF_REDIS_URL", "redis://127.0.0.1:6379/0"))
    return {
        "MAOF_STAGE": "dev",
        "MAOF_DATABASE_URL": BENCH_DATABASE_URL,
        "MAOF_MIGRATION_DATABASE_URL": BENCH_OWNER_DATABASE_URL,
        "MAOF_REDIS_URL": urlunparse(redis._replace(path=f"/{BENCH_REDIS_DB}")),
        "MAOF_STAGE_QUEUE_NAME": BENCH_QUEUE,
        "MAOF_DASHBOARD_BUCKET": BENCH_BUCKET,
        "MAOF_LOG_LEVEL": "WARNING",
        "MAOF_MOCK_AGENT_DELAY_MS": "0",
        "MAOF_MOCK_AGENT_FAILURE_RATE": "0",
        "MAOF_MOCK_AGENTS": "false",
        # Nothing in a benchmark run should be re-sent by the sweeper.
        "MAOF_SWEEP_QUEUED_AFTER_SECONDS": "600",
        "MAOF_SWEEP_INTERVAL_SECONDS": "3600",
        "MAOF_AGENT_HEALTH_INTERVAL_SECONDS": "3600",
        # One benchmark user submits hundreds of runs at once: the per-user limits would
        # measure themselves, not the engine.
        "MAOF_SUBMISSIONS_PER_MINUTE": "1000000",
        "MAOF_MAX_ACTIVE_RUNS": "1000000",
    }


def configure() -> None:
    os.environ.update(bench_environ())
    os.environ.pop("MAOF_STAGE_QUEUE_URL", None)


def prepare() -> None:
    """A fresh, migrated bench database, the bench queue (purged) and Redis db (flushed)."""
    from sqlalchemy import create_engine, text

    from chalicelib import aws, cache, db
    from chalicelib.config import get_settings, reset_settings
    from chalicelib.db.migrate import upgrade
    from devstack.stack import ensure_resources

    reset_settings()
    settings = get_settings()
    assert settings.database_url.endswith(f"/{BENCH_DATABASE}"), settings.database_url
    admin = create_engine(ADMIN_DATABASE_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{BENCH_DATABASE}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{BENCH_DATABASE}"'))
    admin.dispose()
    db.reset()
    upgrade()
    aws.reset()
    ensure_resources(settings)
    # PurgeQueue also drops messages a killed run left in flight; once a minute at most.
    sqs, url = aws.aws_client("sqs"), aws.stage_queue_url()
    try:
        sqs.purge_queue(QueueUrl=url)
    except sqs.exceptions.PurgeQueueInProgress:
        pass
    purge_queue()
    cache.reset()
    cache.get_redis().flushdb()


def purge_queue() -> None:
    """Empty the bench queue (SQS allows one purge a minute: delete what is left instead)."""
    from chalicelib.aws import aws_client, stage_queue_url

    sqs = aws_client("sqs")
    url = stage_queue_url()
    while True:
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get(
            "Messages", []
        )
        if not got:
            return
        sqs.delete_message_batch(
            QueueUrl=url,
            Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(got)
            ],
        )


def bench_log_dir() -> str:
    """Where the servers a benchmark starts write their logs (.maof/logs/bench)."""
    from devstack.stack import STATE_DIR

    folder = STATE_DIR / "logs" / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)
