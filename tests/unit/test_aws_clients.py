"""AWS clients: one per process and kind, however many threads ask at once."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3.session
import pytest

from chalicelib import aws


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Every client boto3 is asked to build (slowly, as a real first build is)."""
    calls: list[tuple[str, Any]] = []

    def client(self: Any, service: str, **kwargs: Any) -> object:
        calls.append((service, kwargs["config"].read_timeout))
        time.sleep(0.05)
        return object()

    aws.reset()
    monkeypatch.setattr(boto3.session.Session, "client", client)
    yield calls
    aws.reset()


def test_threads_asking_at_once_share_one_client(built: list[tuple[str, Any]]) -> None:
    start = threading.Barrier(16)

    def ask(index: int) -> object:
        start.wait()
        return aws.aws_client("sqs", fast_fail=index % 2 == 0)

    with ThreadPoolExecutor(16) as pool:
        clients = list(pool.map(ask, range(16)))

    assert sorted(built) == [("sqs", 1), ("sqs", 25)]  # one fast-fail, one patient
    assert len({id(c) for c in clients}) == 2
    # However the flag is spelled, it is the same client.
    assert aws.aws_client("sqs") is aws.aws_client("sqs", fast_fail=False) is clients[1]
    assert len(built) == 2
