"""Floors: the least the same services can do, measured in the same run.

- SQS hop: one bare message sent to a queue on the same LocalStack while a receiver
  long-polls it (as the poller does), received, deleted — send start to delete done.
- Stage transaction: one bare Postgres transaction like a stage's (an UPDATE … RETURNING
  and an INSERT), psycopg on a warm connection, on the same server.
- Chalice route: a one-line Chalice app answering `{}`, called in process with an API
  Gateway event, and over HTTP through Chalice's local server.
- Redis: one PING round trip (for reference).
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from bench.common import LambdaContext, rest_event, summary_ms

FLOOR_QUEUE = "maof-bench-floor-queue"


class SqsHop:
    """Samples of one bare SQS hop on the floor queue: a receiver long-polls (as the
    poller's workers do), the message is sent, received, deleted."""

    def __init__(self) -> None:
        from chalicelib.aws import new_client

        # A client of its own (configured as the app's), so the engine's SQS calls and the
        # floor's are counted apart.
        self.sqs = new_client("sqs")
        self.url = self.sqs.create_queue(QueueName=FLOOR_QUEUE)["QueueUrl"]

    def sample(self) -> dict[str, float] | None:
        sqs, url = self.sqs, self.url
        received: dict[str, Any] = {}

        def receive() -> None:
            got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=5)
            received["at"] = time.perf_counter()
            messages = got.get("Messages", [])
            if messages:
                sqs.delete_message_batch(
                    QueueUrl=url,
                    Entries=[
                        {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                        for i, m in enumerate(messages)
                    ],
                )
            received["deleted"] = time.perf_counter()
            received["count"] = len(messages)

        receiver = threading.Thread(target=receive)
        receiver.start()
        time.sleep(0.03)  # the receiver is in its long poll
        started = time.perf_counter()
        sqs.send_message(QueueUrl=url, MessageBody='{"floor": true}')
        sent = time.perf_counter()
        receiver.join(10)
        if received.get("count") != 1:
            return None  # a stray message, or none: not a sample
        return {
            "hop": received["deleted"] - started,
            "send": sent - started,
            "send_to_received": received["at"] - started,
            "delete": received["deleted"] - received["at"],
        }


class StageTransaction:
    """Samples of one bare stage-like transaction: UPDATE … RETURNING + INSERT, psycopg on
    a warm connection to the bench database."""

    def __init__(self) -> None:
        import psycopg

        from chalicelib.config import get_settings

        # Its own tables: made as the owner (the application's role may not create tables).
        url = get_settings().migration_database_url.replace(
            "postgresql+psycopg://", "postgresql://"
        )
        self.conn = psycopg.connect(url)
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_floor (id uuid PRIMARY KEY, status text, "
            "n int NOT NULL DEFAULT 0, started_at timestamptz)"
        )
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_floor_log (id bigserial PRIMARY KEY, "
            "row_id uuid, seq int, details jsonb)"
        )
        self.row = uuid.uuid4()
        self.conn.execute("INSERT INTO bench_floor (id, status) VALUES (%s, 'queued')", (self.row,))
        self.conn.commit()

    def sample(self) -> float:
        conn = self.conn
        started = time.perf_counter()
        with conn.transaction():
            n = conn.execute(
                "UPDATE bench_floor SET n = n + 1, status = 'in_progress', "
                "started_at = now() WHERE id = %s RETURNING n",
                (self.row,),
            ).fetchone()
            conn.execute(
                "INSERT INTO bench_floor_log (row_id, seq, details) VALUES (%s, %s, %s)",
                (self.row, n[0] if n else 0, '{"attempt": 1}'),
            )
        return time.perf_counter() - started

    def server_version(self) -> str:
        row = self.conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "unknown"

    def close(self) -> None:
        self.conn.close()


def sqs_hop(iterations: int) -> dict[str, Any]:
    probe = SqsHop()
    for _ in range(5):
        probe.sample()  # warm-up
    samples = [x for x in (probe.sample() for _ in range(iterations)) if x is not None]
    return {
        key: summary_ms([x[key] for x in samples])
        for key in ("hop", "send", "send_to_received", "delete")
    }


def stage_transaction(iterations: int) -> dict[str, Any]:
    probe = StageTransaction()
    try:
        for _ in range(20):
            probe.sample()
        durations = [probe.sample() for _ in range(iterations)]
        return {"transaction": summary_ms(durations), "server_version": probe.server_version()}
    finally:
        probe.close()


def bare_app() -> Any:
    from chalice import Chalice

    bare = Chalice(app_name="bare")

    @bare.route("/")
    def index() -> dict[str, Any]:
        return {}

    return bare


def chalice_route_in_process(iterations: int) -> dict[str, Any]:
    bare = bare_app()
    durations = []
    for index in range(iterations + 50):
        event = rest_event("GET", "/", "/")
        started = time.perf_counter()
        response = bare(event, LambdaContext())
        elapsed = time.perf_counter() - started
        assert response["statusCode"] == 200
        if index >= 50:
            durations.append(elapsed)
    return summary_ms(durations)


def redis_ping(iterations: int) -> dict[str, Any]:
    from chalicelib.cache import get_redis

    client = get_redis()
    durations = []
    for index in range(iterations + 20):
        started = time.perf_counter()
        client.ping()
        if index >= 20:
            durations.append(time.perf_counter() - started)
    return summary_ms(durations)


def run(iterations: int) -> dict[str, Any]:
    print(f"floors: SQS hop, stage transaction, Chalice route, Redis ({iterations} each)")
    hop = sqs_hop(iterations)
    txn = stage_transaction(iterations * 5)
    return {
        "sqs": hop,
        "postgres": txn,
        "chalice_route_in_process": chalice_route_in_process(iterations * 5),
        "redis_ping": redis_ping(iterations * 5),
        "stage_floor_ms": round(hop["hop"]["p50"] + txn["transaction"]["p50"], 3),
    }
