"""EMF metric lines stay whole when many threads write them at once (a batch's records run
concurrently; CloudWatch drops a line that is not one JSON document)."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from chalicelib import observability

THREADS, EACH = 16, 300


@pytest.fixture
def busy_switching(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Metrics on, and threads switched as often as the interpreter allows."""
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def test_threads_writing_metrics_at_once_leave_every_line_whole(
    busy_switching: None, capsys: pytest.CaptureFixture[str]
) -> None:
    start = threading.Barrier(THREADS)

    def emit(thread: int) -> None:
        start.wait()
        for index in range(EACH):
            observability.metric(
                "StagesFinished",
                1,
                dimensions={"Outcome": "completed"},
                runId=f"run-{thread}",
                stageId=str(index),
            )

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(emit, range(THREADS)))

    lines = capsys.readouterr().out.split("\n")
    assert lines.pop() == ""  # the output ends with a newline
    documents = [json.loads(line) for line in lines]  # each line one document
    assert len(documents) == THREADS * EACH
    assert {(d["runId"], d["stageId"]) for d in documents} == {
        (f"run-{t}", str(i)) for t in range(THREADS) for i in range(EACH)
    }
    [directive] = documents[0]["_aws"]["CloudWatchMetrics"]
    assert directive["Dimensions"] == [["service", "Outcome"]]


class ClosedOutput:
    def write(self, text: str) -> int:
        raise BrokenPipeError("the output is gone")

    def flush(self) -> None:
        raise BrokenPipeError("the output is gone")


def test_an_output_that_refuses_a_metric_fails_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    monkeypatch.setattr(sys, "stdout", ClosedOutput())
    observability.metric("StagesFinished", 1)  # raises nothing
