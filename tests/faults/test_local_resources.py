"""The local stack heals a LocalStack restart: LocalStack keeps no state, so the poller
notices the stage queue is gone, creates the queues and the bucket again the way `make dev`
did, re-publishes the dashboard, and goes on draining; it looks at most every few seconds."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from chalicelib.aws import aws_client
from chalicelib.config import Settings, get_settings
from devstack.dashboard import upload_site
from devstack.poller import Poller, ResourceKeeper
from devstack.stack import VISIBILITY_TIMEOUT_SECONDS, ensure_resources
from tests.integration.conftest import wait_until

API_URL = "http://127.0.0.1:3999"


def queue_exists(name: str) -> bool:
    return name in " ".join(
        aws_client("sqs").list_queues(QueueNamePrefix=name).get("QueueUrls", [])
    )


def bucket_keys(bucket: str) -> set[str]:
    try:
        listed = aws_client("s3").list_objects_v2(Bucket=bucket)
    except aws_client("s3").exceptions.NoSuchBucket:
        return set()
    return {item["Key"] for item in listed.get("Contents", [])}


def lose_everything(settings: Settings) -> None:
    """What a LocalStack restart does to our resources."""
    sqs, s3 = aws_client("sqs"), aws_client("s3")
    for name in (settings.stage_queue_name, f"{settings.stage_queue_name}-dlq"):
        if queue_exists(name):
            sqs.delete_queue(QueueUrl=sqs.get_queue_url(QueueName=name)["QueueUrl"])
    keys = bucket_keys(settings.dashboard_bucket)
    if keys:
        s3.delete_objects(
            Bucket=settings.dashboard_bucket, Delete={"Objects": [{"Key": k} for k in keys]}
        )
    if settings.dashboard_bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.delete_bucket(Bucket=settings.dashboard_bucket)


@pytest.fixture
def scratch() -> Iterator[Settings]:
    """A queue (+ DLQ) and a dashboard bucket of their own, made as `make dev` makes them."""
    name = f"maof-test-heal-{uuid.uuid4().hex[:8]}"
    settings = get_settings().model_copy(
        update={"stage_queue_name": name, "dashboard_bucket": name}
    )
    ensure_resources(settings)
    upload_site(API_URL, bucket=name)
    yield settings
    lose_everything(settings)


def test_the_poller_recreates_what_a_localstack_restart_lost_and_keeps_draining(scratch):
    delivered: list[str] = []
    lock = threading.Lock()

    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        for record in event["Records"]:
            with lock:
                delivered.append(record["body"])
            if record["body"] == "before":
                lose_everything(scratch)  # LocalStack restarts while this batch runs
        return {"batchItemFailures": []}

    sqs = aws_client("sqs")
    keeper = ResourceKeeper(scratch, API_URL, interval=0.5)
    poller = Poller(handler, concurrency=1, wait_seconds=1, keeper=keeper)
    poller.queue_url = sqs.get_queue_url(QueueName=scratch.stage_queue_name)["QueueUrl"]
    sqs.send_message(QueueUrl=poller.queue_url, MessageBody="before")
    poller.start()
    try:
        wait_until(lambda: keeper.recreated >= 1, timeout=30)
        # The queue as `make dev` made it: its DLQ redrive and visibility timeout.
        url = sqs.get_queue_url(QueueName=scratch.stage_queue_name)["QueueUrl"]
        assert url == poller.queue_url
        attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        assert attributes["VisibilityTimeout"] == str(VISIBILITY_TIMEOUT_SECONDS)
        redrive = json.loads(attributes["RedrivePolicy"])
        assert redrive["deadLetterTargetArn"].endswith(f"{scratch.stage_queue_name}-dlq")
        # The dashboard, published again for the API it named.
        wait_until(lambda: keeper.republished >= 1, timeout=10)
        assert {"index.html", "config.json"} <= bucket_keys(scratch.dashboard_bucket)
        config = aws_client("s3").get_object(Bucket=scratch.dashboard_bucket, Key="config.json")
        assert json.loads(config["Body"].read()) == {"apiUrl": API_URL}
        website = aws_client("s3").get_bucket_website(Bucket=scratch.dashboard_bucket)
        assert website["IndexDocument"] == {"Suffix": "index.html"}
        # The worker lived through the failed delete and drains the new queue.
        sqs.send_message(QueueUrl=url, MessageBody="after")
        wait_until(lambda: "after" in delivered, timeout=20)
    finally:
        poller.stop()
    assert delivered.count("before") == 1  # deleted with its queue, never redelivered
    assert keeper.recreated == 1


def test_the_keeper_looks_at_most_once_per_interval_and_leaves_a_present_queue_alone(scratch):
    now = [1000.0]
    keeper = ResourceKeeper(scratch, API_URL, interval=5.0, clock=lambda: now[0])
    assert keeper.heal() is False  # the queue is there: nothing to do
    for _ in range(20):
        keeper.heal()
    assert keeper.checks == 1
    now[0] += 4.9
    keeper.heal()
    assert keeper.checks == 1
    lose_everything(scratch)
    now[0] += 0.2
    assert keeper.heal() is True
    assert (keeper.checks, keeper.recreated, keeper.republished) == (2, 1, 1)
    assert queue_exists(scratch.stage_queue_name)
    # Many workers failing at once: one looks, the others go back to waiting.
    now[0] += 10
    threads = [threading.Thread(target=keeper.heal) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert keeper.checks == 3 and keeper.recreated == 1
