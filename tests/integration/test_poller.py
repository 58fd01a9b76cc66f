"""The local SQS event source behaves like Lambda's: real event shape, delete on success,
redelivery on failure, N concurrent executions."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import pytest

from chalicelib.aws import aws_client
from devstack.poller import Poller
from tests.integration.conftest import wait_until


@pytest.fixture
def scratch_queue() -> Any:
    """A queue of its own, with a 1 s visibility timeout so redelivery is quick."""
    sqs = aws_client("sqs")
    url = sqs.create_queue(
        QueueName=f"maof-test-poller-{uuid.uuid4().hex[:8]}", Attributes={"VisibilityTimeout": "1"}
    )["QueueUrl"]
    yield url
    sqs.delete_queue(QueueUrl=url)


def poller_on(queue_url: str, handler: Any, concurrency: int = 1, batch_size: int = 10) -> Poller:
    poller = Poller(handler, concurrency=concurrency, batch_size=batch_size, wait_seconds=1)
    poller.queue_url = queue_url
    poller.queue_arn = aws_client("sqs").get_queue_attributes(
        QueueUrl=queue_url, AttributeNames=["QueueArn"]
    )["Attributes"]["QueueArn"]
    return poller


def send(queue_url: str, *bodies: str) -> None:
    for body in bodies:
        aws_client("sqs").send_message(QueueUrl=queue_url, MessageBody=body)


def test_handler_gets_a_lambda_sqs_event_and_failed_records_are_redelivered(scratch_queue):
    seen: list[str] = []
    records: list[dict[str, Any]] = []
    lock = threading.Lock()

    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        assert context.get_remaining_time_in_millis() > 0
        failures = []
        with lock:
            for record in event["Records"]:
                records.append(record)
                seen.append(record["body"])
                if record["body"] == "fail-once" and seen.count("fail-once") == 1:
                    failures.append({"itemIdentifier": record["messageId"]})
        return {"batchItemFailures": failures}

    send(scratch_queue, "ok", "fail-once")
    poller = poller_on(scratch_queue, handler).start()
    try:
        wait_until(lambda: seen.count("fail-once") == 2, timeout=20)
        wait_until(
            lambda: (
                aws_client("sqs").get_queue_attributes(
                    QueueUrl=scratch_queue,
                    AttributeNames=[
                        "ApproximateNumberOfMessages",
                        "ApproximateNumberOfMessagesNotVisible",
                    ],
                )["Attributes"]
                == {
                    "ApproximateNumberOfMessages": "0",
                    "ApproximateNumberOfMessagesNotVisible": "0",
                }
            ),
            timeout=20,
        )
    finally:
        poller.stop()
    assert seen.count("ok") == 1  # deleted after success, never redelivered
    record = records[0]
    assert {
        "messageId",
        "receiptHandle",
        "body",
        "attributes",
        "messageAttributes",
        "md5OfBody",
        "eventSource",
        "eventSourceARN",
        "awsRegion",
    } <= set(record)
    assert record["eventSource"] == "aws:sqs"
    assert record["eventSourceARN"].endswith(scratch_queue.rsplit("/", 1)[-1])
    assert "ApproximateReceiveCount" in record["attributes"]


def test_a_handler_that_raises_fails_its_whole_batch(scratch_queue):
    calls: list[int] = []

    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        calls.append(len(event["Records"]))
        if len(calls) == 1:
            raise RuntimeError("cold start blew up")
        return {"batchItemFailures": []}

    send(scratch_queue, "a")
    poller = poller_on(scratch_queue, handler).start()
    try:
        wait_until(lambda: len(calls) >= 2, timeout=20)
    finally:
        poller.stop()


def test_concurrency_setting_runs_that_many_handlers_at_once(scratch_queue):
    running = 0
    peak = 0
    lock = threading.Lock()
    release = threading.Event()

    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        release.wait(10)
        with lock:
            running -= 1
        return {"batchItemFailures": []}

    send(scratch_queue, *[json.dumps({"n": i}) for i in range(8)])
    poller = poller_on(scratch_queue, handler, concurrency=4, batch_size=1).start()
    try:
        wait_until(lambda: peak == 4, timeout=20)
    finally:
        release.set()
        poller.stop()
    assert peak == 4


def test_no_message_is_taken_while_every_execution_is_busy(scratch_queue):
    """A receiver takes messages only for a free execution: none waits received (its
    visibility timeout running) behind a busy one, as with Lambda's event source."""
    seen: list[str] = []
    release = threading.Event()

    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        for record in event["Records"]:
            seen.append(record["body"])
            if record["body"] == "long":
                release.wait(10)
        return {"batchItemFailures": []}

    sqs = aws_client("sqs")
    send(scratch_queue, "long")
    poller = poller_on(scratch_queue, handler, concurrency=1, batch_size=1).start()
    try:
        wait_until(lambda: seen == ["long"], timeout=20)
        send(scratch_queue, "next")
        time.sleep(1.5)  # a free receiver would have taken it by now
        visible = sqs.get_queue_attributes(
            QueueUrl=scratch_queue, AttributeNames=["ApproximateNumberOfMessages"]
        )["Attributes"]["ApproximateNumberOfMessages"]
        assert (seen, visible) == (["long"], "1")
        release.set()
        wait_until(lambda: seen == ["long", "next"], timeout=20)
    finally:
        release.set()
        poller.stop()


def test_a_delete_sqs_refuses_is_tried_again_and_counted(scratch_queue):
    """SQS (LocalStack too) answers a delete it cannot do in the batch's `Failed` list, not
    as an error: the handled message that was not deleted is counted, the others deleted."""
    sqs = aws_client("sqs")
    send(scratch_queue, "handled")
    received = wait_until(
        lambda: sqs.receive_message(QueueUrl=scratch_queue, WaitTimeSeconds=1).get("Messages"),
        timeout=20,
    )
    poller = poller_on(scratch_queue, lambda event, context: {"batchItemFailures": []})
    bogus = {"MessageId": "m-bogus", "ReceiptHandle": "not-a-receipt-handle", "Body": "x"}
    poller.deliver([*received, bogus])
    assert (poller.invocations, poller.failures, poller.undeleted) == (1, 0, 1)
    counts = sqs.get_queue_attributes(
        QueueUrl=scratch_queue,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    assert counts == {
        "ApproximateNumberOfMessages": "0",
        "ApproximateNumberOfMessagesNotVisible": "0",
    }
