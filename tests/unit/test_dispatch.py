"""How an agent's HTTP answer maps to an output or a (non-)retryable failure."""

from __future__ import annotations

import json

import pytest

from chalicelib.agents.dispatch import AgentCallFailed, AgentTask, interpret


def answer(document: object) -> bytes:
    return json.dumps(document).encode()


def test_success_answer_gives_its_output():
    assert interpret(200, answer({"status": "success", "output": {"a": 1}})) == {"a": 1}


def test_success_output_may_be_any_json_value():
    assert interpret(200, answer({"status": "success", "output": None})) is None


@pytest.mark.parametrize(
    ("status", "body", "retryable"),
    [
        (200, answer({"status": "error", "code": "X", "message": "m", "retryable": True}), True),
        (200, answer({"status": "error", "code": "X", "message": "m", "retryable": False}), False),
        (200, answer({"status": "error", "code": "X", "message": "m"}), False),
        (200, b"<html>not json</html>", True),
        (200, answer({"output": 1}), True),
        (200, answer({"status": "success"}), True),
        (408, b"", True),
        (429, b"", True),
        (500, b"", True),
        (502, b"", True),
        (503, answer({"message": "busy"}), True),
        (504, b"", True),
        (400, b"", False),
        (401, b"", False),
        (403, b"", False),
        (404, b"", False),
        (422, b"", False),
        (302, b"", False),
    ],
)
def test_failures_map_to_the_documented_retryable_table(status, body, retryable):
    with pytest.raises(AgentCallFailed) as failed:
        interpret(status, body)
    assert failed.value.retryable is retryable


def test_error_message_carries_the_agents_code_and_message():
    with pytest.raises(AgentCallFailed, match="BAD_INPUT: no text"):
        interpret(200, answer({"status": "error", "code": "BAD_INPUT", "message": "no text"}))


def test_task_body_and_idempotency_key_follow_the_protocol():
    task = AgentTask("wfr-1", "s1", 3, "summarization", {"t": 1}, "wf", [{"stageId": "s0"}], 5000)
    assert task.idempotency_key == "wfr-1:s1:3"
    assert task.body() == {
        "workflowRunId": "wfr-1",
        "stageId": "s1",
        "capability": "summarization",
        "input": {"t": 1},
        "context": {
            "workflowName": "wf",
            "previousStages": [{"stageId": "s0"}],
            "deadlineMs": 5000,
        },
    }
