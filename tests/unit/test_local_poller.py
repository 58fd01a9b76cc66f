"""The local poller's own sizing: it stands in for many Lambda executions in one process."""

import os
import threading

from chalicelib.config import get_settings, reset_settings
from devstack import poller as poller_module
from devstack.poller import pool_size, shares, size_database_pool


def test_the_poller_keeps_two_database_connections_per_execution_unless_told():
    environ: dict[str, str] = {}
    size_database_pool(environ, 16)
    assert environ["MAOF_DB_POOL_SIZE"] == "32"
    environ["MAOF_DB_POOL_SIZE"] = ""  # empty is unset
    size_database_pool(environ, 64)
    assert environ["MAOF_DB_POOL_SIZE"] == "100"  # the setting's ceiling
    environ["MAOF_DB_POOL_SIZE"] = "7"
    size_database_pool(environ, 16)
    assert environ["MAOF_DB_POOL_SIZE"] == "7"


def test_the_sized_pool_is_what_the_settings_read(monkeypatch):
    monkeypatch.delenv("MAOF_DB_POOL_SIZE", raising=False)
    try:
        size_database_pool(os.environ, 4)
        assert get_settings().db_pool_size == 8
    finally:
        monkeypatch.delenv("MAOF_DB_POOL_SIZE", raising=False)
        reset_settings()


def test_executions_are_shared_out_over_the_processes_as_evenly_as_they_go():
    assert shares(16, 2) == [8, 8]
    assert shares(5, 2) == [3, 2]
    assert shares(16, 1) == [16]
    assert shares(2, 4) == [1, 1]  # never a process without an execution


def test_each_process_keeps_connections_for_its_own_executions():
    assert sum(pool_size(None, share) for share in shares(16, 2)) == 32
    assert pool_size("7", 8) == 7
    assert pool_size("", 8) == 16


class RefusingSqs:
    """delete_message_batch answering each call's `Failed` entries from a script (SQS
    answers a delete it could not do there, not as an error)."""

    def __init__(self, *refusals: set[str]) -> None:
        self.refusals = list(refusals)
        self.calls: list[list[dict[str, str]]] = []

    def delete_message_batch(self, QueueUrl: str, Entries: list[dict[str, str]]) -> dict:
        self.calls.append(Entries)
        refused = self.refusals.pop(0) if self.refusals else set()
        return {
            "Successful": [{"Id": e["Id"]} for e in Entries if e["ReceiptHandle"] not in refused],
            "Failed": [
                {"Id": e["Id"], "Code": "InternalError", "SenderFault": False, "Message": "try"}
                for e in Entries
                if e["ReceiptHandle"] in refused
            ],
        }


class Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict]] = []

    def warning(self, message: str, extra: dict) -> None:
        self.lines.append(("warning", message, extra))

    def error(self, message: str, extra: dict) -> None:
        self.lines.append(("error", message, extra))


def poller_with(monkeypatch, sqs: RefusingSqs) -> tuple[poller_module.Poller, Recorder]:
    log = Recorder()
    monkeypatch.setattr(poller_module, "aws_client", lambda _name: sqs)
    monkeypatch.setattr(poller_module, "logger", log)
    p = object.__new__(poller_module.Poller)  # no queue to look up: only delivery is tested
    p.handler = lambda event, context: {"batchItemFailures": []}
    p.queue_arn, p.region, p.queue_url = "arn:aws:sqs:us-east-1:0:q", "us-east-1", "q"
    p.invocations = p.failures = p.undeleted = 0
    p._lock = threading.Lock()
    return p, log


MESSAGES = [{"MessageId": f"m{n}", "ReceiptHandle": f"h{n}", "Body": "{}"} for n in (1, 2, 3)]


def test_a_refused_delete_is_logged_and_tried_once_more(monkeypatch):
    sqs = RefusingSqs({"h2"})  # refused once, deleted the second time
    p, log = poller_with(monkeypatch, sqs)
    p.deliver(MESSAGES)
    assert [[e["ReceiptHandle"] for e in call] for call in sqs.calls] == [
        ["h1", "h2", "h3"],
        ["h2"],
    ]
    assert [(level, extra["failed"]) for level, _, extra in log.lines] == [
        (
            "warning",
            [{"messageId": "m2", "code": "InternalError", "senderFault": False, "message": "try"}],
        )
    ]
    assert p.undeleted == 0 and p.failures == 0


def test_a_delete_refused_twice_is_counted_and_logged_as_an_error(monkeypatch):
    sqs = RefusingSqs({"h1", "h3"}, {"h3"})
    p, log = poller_with(monkeypatch, sqs)
    p.deliver(MESSAGES)
    assert len(sqs.calls) == 2  # tried once more, never a third time
    assert [level for level, _, _ in log.lines] == ["warning", "error"]
    assert [f["messageId"] for f in log.lines[1][2]["failed"]] == ["m3"]
    assert p.undeleted == 1
