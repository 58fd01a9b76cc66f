"""Every run ends: the sweeper's ceilings and its backlog rule, the size caps, a stage
whose run ended meanwhile, a claim that reads only what it needs, and a submission that
answers quickly when SQS does not."""

from __future__ import annotations

import socket
import threading
import time
import types
import uuid
from typing import Any

import pytest
import requests
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from chalicelib import db
from chalicelib.config import get_settings, reset_settings
from chalicelib.core import api as run_ids
from chalicelib.db import session_scope
from chalicelib.engine import handlers, stages, sweeper
from tests.integration.conftest import Api, register_agent, unique_capability, wait_for_run
from tests.integration.test_delivery import (
    audit_actions,
    chain,
    record,
    stage_row,
    submit_direct,
)
from tests.support.agents import ScriptedAgent, ok


def set_stage(run_id: uuid.UUID, stage_id: str, assignments: str, **params: Any) -> None:
    with session_scope() as session:
        session.execute(
            text(
                f"UPDATE stage_executions SET {assignments} "
                "WHERE run_id = :run_id AND stage_id = :stage_id"
            ),
            {"run_id": run_id, "stage_id": stage_id, **params},
        )


# ------------------------------------------------------------------ the sweeper's ceilings


def test_a_stage_whose_worker_keeps_dying_fails_after_the_lease_ceiling(user: Api, sent):
    capability = unique_capability("dying")
    register_agent(user, capability)
    run_id = submit_direct(user, chain(capability, "a", "b"))
    ceiling = get_settings().stage_max_lease_expiries
    for expiry in range(ceiling + 1):
        assert stages.claim_stage(run_id, "a") is not None  # a worker takes it, then dies
        set_stage(run_id, "a", "lease_expires_at = now() - interval '1 second'")
        swept = sweeper.sweep_run(run_id, ["a"], sweeper.grace_for(0))
        if expiry < ceiling:
            assert swept.requeued == ["a"]
            set_stage(run_id, "a", "queued_at = now()")
    assert swept.failed == ["a"]
    row = stage_row(run_id, "a")
    assert row.status == "failed"
    assert f"stopped {ceiling} times" in (row.error_message or "")
    assert stage_row(run_id, "b").status == "skipped"
    run = user.get(f"/workflows/{run_ids.run_ref(run_id)}").json()["data"]
    assert run["status"] == "failed"
    assert "MAOF_STAGE_MAX_LEASE_EXPIRIES" in run["errorMessage"]


def test_a_cancelled_runs_stage_whose_worker_died_ends_cancelled(user: Api, sent):
    """The sweeper ends a dead worker's stage of a cancelled run as the worker would have
    (and as the cancel did the stages not started): cancelled, not skipped."""
    capability = unique_capability("cancelled")
    register_agent(user, capability)
    run_id = submit_direct(user, chain(capability, "a", "b"))
    assert stages.claim_stage(run_id, "a") is not None  # a worker takes it, then dies
    cancelled = user.post(f"/workflows/{run_ids.run_ref(run_id)}/cancel")
    assert cancelled.status_code == 202, cancelled.text
    set_stage(run_id, "a", "lease_expires_at = now() - interval '1 second'")
    assert sweeper.sweep_run(run_id, ["a"], sweeper.grace_for(0)).skipped == ["a"]
    assert [stage_row(run_id, s).status for s in ("a", "b")] == ["cancelled", "cancelled"]


def test_a_stage_whose_message_keeps_getting_lost_fails_after_the_requeue_ceiling(user: Api, sent):
    capability = unique_capability("lost")
    register_agent(user, capability)
    run_id = submit_direct(user, chain(capability, "a"))
    ceiling = get_settings().stage_max_requeues
    for _ in range(ceiling):
        set_stage(run_id, "a", "queued_at = now() - interval '1 hour'")
        assert sweeper.sweep_run(run_id, ["a"], sweeper.grace_for(0)).requeued == ["a"]
    set_stage(run_id, "a", "queued_at = now() - interval '1 hour'")
    assert sweeper.sweep_run(run_id, ["a"], sweeper.grace_for(0)).failed == ["a"]
    assert "lost" in (stage_row(run_id, "a").error_message or "")
    assert audit_actions(run_id).count(("requeue", "a")) == ceiling


def test_behind_a_backlog_a_queued_stage_is_not_sent_twice(
    user: Api, sent, monkeypatch, nothing_else_stalled
):
    capability = unique_capability("backlog")
    register_agent(user, capability)
    run_id = submit_direct(user, chain(capability, "a"))
    queued_after = get_settings().sweep_queued_after_seconds
    set_stage(run_id, "a", f"queued_at = now() - interval '{queued_after + 5} seconds'")
    monkeypatch.setattr(sweeper, "send_stage_messages", sent)
    monkeypatch.setattr(sweeper, "queue_backlog", lambda: 250)  # its message may be in there
    assert run_id not in sweeper.find_stalled(sweeper.grace_for(250))
    sweeper.sweep_once()
    assert stage_row(run_id, "a").requeues == 0
    monkeypatch.setattr(sweeper, "queue_backlog", lambda: 0)  # nothing can be on its way
    sweeper.sweep_once()
    assert stage_row(run_id, "a").requeues == 1
    assert sent.sent.count((run_id, "a")) == 2  # at submission, and by the sweeper


def resent_uncounted_past_its_requeues(run_id: uuid.UUID, sent: Any) -> int:
    """Sweep once per backlog interval, MAOF_STAGE_MAX_REQUEUES + 1 times: stage `a` is
    re-sent each time, uncounted, and still queued. Returns the re-sends."""
    backlog_after = get_settings().sweep_backlog_after_seconds
    resends = get_settings().stage_max_requeues + 1
    for _ in range(resends):
        set_stage(run_id, "a", f"queued_at = now() - interval '{backlog_after + 1} seconds'")
        sweeper.sweep_once()
    assert sent.sent.count((run_id, "a")) == 1 + resends  # at submission, then each interval
    row = stage_row(run_id, "a")
    assert (row.status, row.requeues) == ("queued", 0), row.error_message
    return resends


def test_a_stage_behind_a_backlog_longer_than_its_requeues_is_not_failed_as_lost(
    user: Api, sent, monkeypatch, nothing_else_stalled
):
    """A backlog outlasting MAOF_STAGE_MAX_REQUEUES x MAOF_SWEEP_BACKLOG_AFTER_SECONDS: the
    stage is re-sent once per backlog interval, uncounted, and runs when a message comes up;
    each re-send was counted as a lost message, and the run failed while its message was in
    line."""
    capability = unique_capability("longbacklog")
    register_agent(user, capability)
    run_id = submit_direct(user, chain(capability, "a"))
    monkeypatch.setattr(sweeper, "send_stage_messages", sent)
    monkeypatch.setattr(sweeper, "queue_backlog", lambda: 5000)
    resends = resent_uncounted_past_its_requeues(run_id, sent)
    with session_scope() as session:
        requeues = (
            session.execute(
                text("SELECT details FROM execution_logs WHERE run_id = :r AND action = 'requeue'"),
                {"r": run_id},
            )
            .scalars()
            .all()
        )
    assert [d["counted"] for d in requeues] == [False] * resends
    assert handlers.run_stage(run_id, "a") == "completed"  # a message comes up
    with session_scope() as session:
        status = session.execute(
            text("SELECT status FROM workflow_runs WHERE id = :r"), {"r": run_id}
        ).scalar()
    assert status == "completed"


def test_a_queue_whose_depth_sqs_will_not_tell_is_treated_as_a_backlog(
    user: Api, sent, monkeypatch, nothing_else_stalled
):
    """GetQueueAttributes throttled (or slower than the fast-fail client): the depth was
    read as an empty queue, so behind a real backlog every stage was re-sent after 10 s,
    each re-send counted as a lost message, and a healthy run failed after
    MAOF_STAGE_MAX_REQUEUES sweeps. Unknown, it may be a backlog: the backlog's grace, and
    re-sends uncounted."""
    from botocore.exceptions import ClientError

    class Throttled:
        def get_queue_attributes(self, **_: Any) -> Any:
            error = {"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}}
            raise ClientError(error, "GetQueueAttributes")

    monkeypatch.setattr(sweeper, "aws_client", lambda *_, **__: Throttled())
    monkeypatch.setattr(sweeper, "send_stage_messages", sent)
    assert sweeper.queue_backlog() is None
    capability = unique_capability("depthunknown")
    register_agent(user, capability)
    run_id = submit_direct(user, chain(capability, "a"))
    queued_after = get_settings().sweep_queued_after_seconds
    set_stage(run_id, "a", f"queued_at = now() - interval '{queued_after + 1} seconds'")
    sweeper.sweep_once()
    assert sent.sent.count((run_id, "a")) == 1, "a possible backlog was duplicated"
    resent_uncounted_past_its_requeues(run_id, sent)


def test_delayed_messages_are_no_backlog(monkeypatch):
    """A delayed message is a stage's that is not due (a backoff): counted, one retry of
    any run put every lost message on the 300 s grace instead of 10 s."""
    asked: list[list[str]] = []

    class Queue:
        def get_queue_attributes(self, QueueUrl: str, AttributeNames: list[str]) -> Any:
            asked.append(AttributeNames)
            counts = {"ApproximateNumberOfMessages": "0", "ApproximateNumberOfMessagesDelayed": "7"}
            return {"Attributes": {name: counts[name] for name in AttributeNames}}

    monkeypatch.setattr(sweeper, "aws_client", lambda *_, **__: Queue())
    assert sweeper.queue_backlog() == 0
    assert sweeper.grace_for(sweeper.queue_backlog()).total_seconds() == (
        get_settings().sweep_queued_after_seconds
    )
    assert asked == [["ApproximateNumberOfMessages"]] * 2


def test_a_sweep_takes_the_stages_stalled_longest_first(user: Api, sent, monkeypatch):
    """More stalled stages than one sweep takes: the oldest go first (the batch had no
    order, and a stage could be passed over sweep after sweep)."""
    capability = unique_capability("oldest")
    register_agent(user, capability)
    run_ids = [submit_direct(user, chain(capability, "a")) for _ in range(5)]
    # The later a run was submitted, the longer it has stalled (far longer than any other
    # test's stage, so the batch is ours); the last one's worker died.
    for days, run_id in enumerate(run_ids[:-1], start=1000):
        set_stage(run_id, "a", "queued_at = now() - make_interval(days => :d)", d=days)
    assert stages.claim_stage(run_ids[-1], "a") is not None
    set_stage(run_ids[-1], "a", "lease_expires_at = now() - interval '2000 days'")
    monkeypatch.setattr(sweeper, "BATCH_LIMIT", 2)
    assert set(sweeper.find_stalled(sweeper.grace_for(0))) == {run_ids[-1], run_ids[-2]}


def test_an_error_on_one_run_does_not_stop_the_sweep(user: Api, sent, monkeypatch):
    capability = unique_capability("sweep")
    register_agent(user, capability)
    broken, fine = (submit_direct(user, chain(capability, "a")) for _ in range(2))
    for run_id in (broken, fine):
        set_stage(run_id, "a", "queued_at = now() - interval '1 hour'")
    real = sweeper.sweep_run

    def sweep_run(run_id: uuid.UUID, *args: Any) -> Any:
        if run_id == broken:
            raise RuntimeError("one bad run")
        return real(run_id, *args)

    monkeypatch.setattr(sweeper, "sweep_run", sweep_run)
    monkeypatch.setattr(sweeper, "send_stage_messages", sent)
    monkeypatch.setattr(sweeper, "queue_backlog", lambda: 0)
    totals = sweeper.sweep_once()
    assert totals["errors"] >= 1
    assert stage_row(fine, "a").requeues == 1


def test_a_requeue_whose_send_fails_is_reported_as_requeued_and_as_an_error(
    user: Api, sent, monkeypatch, nothing_else_stalled
):
    """The requeue is committed (requeues + 1, an audit entry) before its send: a send SQS
    refused (throttled) left it out of the sweep's totals, and of the SweeperRequeues
    metric, while the database and the audit trail recorded it."""
    capability = unique_capability("sendfail")
    register_agent(user, capability)
    run_id = submit_direct(user, chain(capability, "a"))
    set_stage(run_id, "a", "queued_at = now() - interval '1 hour'")

    def throttled(*_: Any, **__: Any) -> None:
        raise RuntimeError("SendMessageBatch throttled")

    monkeypatch.setattr(sweeper, "send_stage_messages", throttled)
    monkeypatch.setattr(sweeper, "queue_backlog", lambda: 0)
    totals = sweeper.sweep_once()
    assert stage_row(run_id, "a").requeues == 1
    assert ("requeue", "a") in audit_actions(run_id)
    assert totals["requeued"] >= 1, totals
    assert totals["errors"] >= 1, totals


# ------------------------------------------------------------------ runs that ended


def test_no_agent_is_called_for_a_stage_whose_run_failed_meanwhile(user: Api, sent):
    agent = ScriptedAgent(default=ok({"x": 1})).start()
    try:
        capability = unique_capability("ended")
        register_agent(user, capability, endpoint=agent.url)
        stages_ = [
            {"id": "a", "name": "A", "agentCapability": capability},
            {"id": "b", "name": "B", "agentCapability": capability},
        ]
        run_id = submit_direct(user, stages_)
        claimed = stages.claim_stage(run_id, "a")
        assert claimed is not None
        assert stages.fail_stage(claimed, "it broke") == "failed"  # the run fails; b is skipped
        assert handlers.run_stage_batch([record(run_id, "b")]) == {"batchItemFailures": []}
        assert agent.calls == []
        assert stage_row(run_id, "b").status == "skipped"
    finally:
        agent.stop()


@pytest.mark.parametrize(
    ("action", "agent_id", "outcome", "entry"),
    [
        # MAOF's own error (no agent answered): the stage is skipped with its run.
        ("retry", None, stages.Requeued.SKIPPED, "skip"),
        # The agent's error came back after the run had ended: a `discard` entry records it
        # (as for a final error or an output), not a `skip` as if nothing had come back.
        ("retry", "the-agent", stages.Requeued.DISCARDED, "discard"),
        ("fallback", "the-agent", stages.Requeued.DISCARDED, "discard"),
    ],
)
def test_a_retry_of_a_stage_whose_run_ended_is_not_queued(
    user: Api, sent, action: str, agent_id: str | None, outcome: stages.Requeued, entry: str
):
    capability = unique_capability("retry-ended")
    register_agent(user, capability)
    stages_ = [
        {"id": "a", "name": "A", "agentCapability": capability},
        {"id": "b", "name": "B", "agentCapability": capability},
    ]
    run_id = submit_direct(user, stages_)
    a, b = stages.claim_stage(run_id, "a"), stages.claim_stage(run_id, "b")
    assert a is not None and b is not None
    assert stages.fail_stage(a, "it broke") == "failed"
    result = stages.requeue_later(
        b,
        0,
        action,
        agent_uuid=None,
        agent_id=agent_id,
        agent_attempts=1,
        tried_agents=[],
        next_attempt=True,
        details={"error": "agent 'the-agent' failed: FLAKY: try again", "code": "FLAKY"},
    )
    assert result is outcome
    row = stage_row(run_id, "b")
    assert (row.status, row.agent_id) == ("skipped", agent_id)
    assert audit_actions(run_id)[-1] == (entry, "b")


def test_a_stage_failing_after_its_run_failed_ends_with_the_run_not_as_a_second_failure(
    user: Api, sent
):
    """Run a fails; b's agent then answers an error, and c fails for a reason of its own
    (no agent answered): b's error is discarded, c is skipped, and the run keeps the one
    failure that ended it (each used to become `failed`, with a `fail` entry)."""
    capability = unique_capability("late-fail")
    register_agent(user, capability)
    stages_ = [{"id": sid, "name": sid, "agentCapability": capability} for sid in "abc"]
    run_id = submit_direct(user, stages_)
    a, b, c = (stages.claim_stage(run_id, sid) for sid in "abc")
    assert a is not None and b is not None and c is not None
    assert stages.fail_stage(a, "it broke") == "failed"
    assert stages.fail_stage(b, "agent 'x' failed: BROKEN", agent_id="x") == "discarded"
    assert stages.fail_stage(c, "internal error: boom") == "skipped"
    assert stages.fail_stage(c, "internal error: boom") == "lost"  # no longer ours
    assert (stage_row(run_id, "b").status, stage_row(run_id, "c").status) == ("skipped",) * 2
    assert audit_actions(run_id) == [
        ("submit", None),
        ("fail", "a"),
        ("discard", "b"),
        ("skip", "c"),
    ]
    with session_scope() as session:
        run = session.execute(
            text("SELECT status, error_message FROM workflow_runs WHERE id = :id"), {"id": run_id}
        ).one()
    assert run.status == "failed" and "Stage 'a'" in run.error_message


# ------------------------------------------------------------------ what a claim reads


def test_a_claim_reads_only_the_outputs_its_input_references(user: Api, sent):
    capability = unique_capability("needs")
    register_agent(user, capability)
    stages_ = [
        {"id": "a", "name": "A", "agentCapability": capability},
        {"id": "b", "name": "B", "agentCapability": capability},
        {
            "id": "c",
            "name": "C",
            "agentCapability": capability,
            "dependencies": ["a", "b"],
            "input": {"only": "${b.output.result}"},
        },
        {"id": "d", "name": "D", "agentCapability": capability, "dependencies": ["a", "b"]},
    ]
    run_id = submit_direct(user, stages_)
    handlers.run_stage_batch([record(run_id, "a"), record(run_id, "b")])
    c, d = stages.claim_stage(run_id, "c"), stages.claim_stage(run_id, "d")
    assert c is not None and d is not None
    assert c.context is not None and set(c.context.outputs) == {"b"}
    assert d.context is not None and set(d.context.outputs) == {"a", "b"}  # its default input


# ------------------------------------------------------------------ size caps


@pytest.fixture
def small_caps(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("MAOF_STAGE_MAX_INPUT_BYTES", "2000")
    monkeypatch.setenv("MAOF_RUN_MAX_OUTPUT_BYTES", "3000")
    reset_settings()
    yield
    monkeypatch.undo()
    reset_settings()


def test_a_submission_whose_input_already_expands_past_the_cap_is_400(user: Api, small_caps):
    body = {
        "workflow": {
            "name": "big",
            "stages": [
                {
                    "id": "a",
                    "name": "A",
                    "agentCapability": unique_capability(),
                    "input": ["${workflow.input.text}"] * 50,  # 50 copies of 100 bytes
                }
            ],
        },
        "input": {"text": "x" * 100},
    }
    response = user.post("/workflows/execute", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["details"][0]["field"] == "workflow.stages.0.input"
    assert "MAOF_STAGE_MAX_INPUT_BYTES" in error["message"]


def test_an_input_expanding_a_stage_output_past_the_cap_fails_the_stage_unexpanded(
    user: Api, sent, small_caps, monkeypatch
):
    capability = unique_capability("expand")
    register_agent(user, capability)
    stages_ = [
        {"id": "a", "name": "A", "agentCapability": capability},
        {
            "id": "b",
            "name": "B",
            "agentCapability": capability,
            "dependencies": ["a"],
            "input": ["${a.output}"] * 50,  # 50 copies of a's output: never built
        },
    ]
    run_id = submit_direct(user, stages_)
    handlers.run_stage_batch([record(run_id, "a")])

    def refuse(*args: Any) -> Any:
        raise AssertionError("the oversized input was expanded")

    monkeypatch.setattr(handlers, "resolve", refuse)
    handlers.run_stage_batch([record(run_id, "b")])
    row = stage_row(run_id, "b")
    assert row.status == "failed"
    assert "MAOF_STAGE_MAX_INPUT_BYTES" in (row.error_message or "")


def test_a_fan_in_without_input_over_the_cap_fails_the_stage_before_its_agent_is_called(
    user: Api, sent, small_caps
):
    """Without `input`, a stage is sent its dependencies' outputs: held to the same cap
    (two outputs of 1.5 KB reached the agent past a 2,000-byte cap)."""
    producer = ScriptedAgent(default=ok({"blob": "y" * 1400})).start()
    sink = ScriptedAgent().start()
    try:
        made, sunk = unique_capability("made"), unique_capability("sink")
        register_agent(user, made, endpoint=producer.url)
        register_agent(user, sunk, endpoint=sink.url)
        stages_ = [
            {"id": "a", "name": "A", "agentCapability": made},
            {"id": "b", "name": "B", "agentCapability": made},
            {"id": "c", "name": "C", "agentCapability": sunk, "dependencies": ["a", "b"]},
        ]
        run_id = submit_direct(user, stages_)
        handlers.run_stage_batch([record(run_id, "a"), record(run_id, "b")])
        handlers.run_stage_batch([record(run_id, "c")])
        row = stage_row(run_id, "c")
        assert row.status == "failed"
        assert "MAOF_STAGE_MAX_INPUT_BYTES" in (row.error_message or "")
        assert sink.calls == []
    finally:
        producer.stop()
        sink.stop()


def test_a_first_stage_without_input_is_400_when_the_workflow_input_is_over_the_cap(
    user: Api, small_caps
):
    stage = {"id": "a", "name": "A", "agentCapability": unique_capability()}
    body = {"workflow": {"name": "big", "stages": [stage]}, "input": {"text": "x" * 2000}}
    response = user.post("/workflows/execute", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["details"][0]["field"] == "workflow.stages.0.input"


# 1e308 is 6 bytes as JSON writes it, and 309 digits as JSONB stores it and the API serves it.
STORED_LONG = [1e308] * 10  # 71 bytes as written, 3,101 as stored


@pytest.mark.parametrize(
    "template",
    [None, "${workflow.input}", "all: ${workflow.input}", STORED_LONG],
    ids=["sent as it is", "referenced whole", "interpolated", "written in the template"],
)
def test_a_submission_of_numbers_over_the_input_cap_only_as_stored_is_400(
    user: Api, small_caps, template: Any
):
    """The stage is resolved from the stored workflow input and template, where JSONB
    writes 1e308 out in full: an input checked at its written size was accepted (202) and
    failed its first stage for being more than the cap it had been checked against."""
    stage = {"id": "a", "name": "A", "agentCapability": unique_capability()}
    if template is not None:
        stage["input"] = template
    body = {"workflow": {"name": "floats", "stages": [stage]}, "input": STORED_LONG}
    response = user.post("/workflows/execute", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    assert error["details"][0]["field"] == "workflow.stages.0.input"
    assert "MAOF_STAGE_MAX_INPUT_BYTES" in error["message"]


def test_an_output_of_numbers_over_the_output_cap_only_as_stored_is_invalid_output(
    user: Api, sent, small_caps, monkeypatch
):
    """An output of 1e308s passed the cap at its written size, then was served by GET
    /workflows/{id}, and passed to the next stage, 45 times larger."""
    monkeypatch.setenv("MAOF_STAGE_MAX_OUTPUT_BYTES", "2000")
    reset_settings()
    agent = ScriptedAgent(default=ok(STORED_LONG)).start()
    try:
        capability = unique_capability("floats")
        register_agent(user, capability, endpoint=agent.url)
        run_id = submit_direct(user, chain(capability, "a", "b"))
        handlers.run_stage_batch([record(run_id, "a")])
        assert len(agent.calls) == 1
        row = stage_row(run_id, "a")
        assert row.status == "failed"
        assert "INVALID_OUTPUT" in (row.error_message or "")
        assert "MAOF_STAGE_MAX_OUTPUT_BYTES" in (row.error_message or "")
        detail = user.get(f"/workflows/{run_ids.run_ref(run_id)}")
        assert len(detail.content) < 2000, detail.text
    finally:
        agent.stop()


def test_small_floats_under_the_caps_as_served_are_accepted(
    user: Api, sent, small_caps, monkeypatch
):
    """A negative exponent comes back from JSONB a float and is served as written; counted
    as Postgres's decimal text, 200 x 3.2e-12 (1,601 bytes) passed a 2,000-byte output
    cap and 20 x 1e-300 a 2,000-byte input cap, and both were refused."""
    monkeypatch.setenv("MAOF_STAGE_MAX_OUTPUT_BYTES", "2000")
    monkeypatch.setenv("MAOF_STAGE_MAX_INPUT_BYTES", "2000")
    reset_settings()
    output = [3.2e-12] * 200
    agent = ScriptedAgent(default=ok(output)).start()
    try:
        capability = unique_capability("small")
        register_agent(user, capability, endpoint=agent.url)
        stage = {"id": "a", "name": "A", "agentCapability": capability}
        body = {"workflow": {"name": "tiny", "stages": [stage]}, "input": [1e-300] * 20}
        response = user.post("/workflows/execute", body)
        assert response.status_code == 202, response.text
        run_id = submit_direct(user, chain(capability, "a"))
        handlers.run_stage_batch([record(run_id, "a")])
        row = stage_row(run_id, "a")
        assert row.status == "completed", row.error_message
        detail = user.get(f"/workflows/{run_ids.run_ref(run_id)}").json()["data"]
        assert detail["stages"][0]["output"] == output
    finally:
        agent.stop()


@pytest.mark.parametrize(
    ("output", "stage_input"),
    [
        ({"blob": "y" * 1800}, None),  # the outputs pass the run total
        # Counted as stored: 1,551 bytes each, a's output (and b's input) and b's output.
        ([1e308] * 5, None),
        # Each completed stage's resolved input is stored (and answered by the run's
        # detail) with its output: one large input given to many stages must not grow the
        # run past MAOF_RUN_MAX_OUTPUT_BYTES while their outputs stay tiny.
        ({"r": 1}, "x" * 1900),  # under the stage input cap (2,000), two over the run's
    ],
)
def test_what_a_run_stores_past_its_total_fails_the_stage_and_the_run(
    user: Api, sent, small_caps, output: Any, stage_input: str | None
):
    agent = ScriptedAgent(default=ok(output)).start()
    try:
        capability = unique_capability("total")
        register_agent(user, capability, endpoint=agent.url)
        stages_ = chain(capability, "a", "b")
        for stage in stages_ if stage_input is not None else []:
            stage["input"] = stage_input
        run_id = submit_direct(user, stages_)
        handlers.run_stage_batch([record(run_id, "a")])
        assert stage_row(run_id, "a").status == "completed"
        handlers.run_stage_batch([record(run_id, "b")])
        row = stage_row(run_id, "b")
        assert row.status == "failed"
        assert "MAOF_RUN_MAX_OUTPUT_BYTES" in (row.error_message or "")
        run = user.get(f"/workflows/{run_ids.run_ref(run_id)}").json()["data"]
        assert run["status"] == "failed"
        assert "MAOF_RUN_MAX_OUTPUT_BYTES" in run["errorMessage"]
    finally:
        agent.stop()


def test_a_stage_timeout_longer_than_run_stage_can_wait_is_400(user: Api):
    longest = get_settings().max_stage_timeout_ms
    body = {
        "workflow": {
            "name": "slow",
            "stages": [
                {
                    "id": "a",
                    "name": "A",
                    "agentCapability": unique_capability(),
                    "config": {"timeoutMs": longest + 1},
                }
            ],
        }
    }
    response = user.post("/workflows/execute", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["details"][0]["field"] == "workflow.stages.0.config.timeoutMs"
    body["workflow"]["stages"][0]["config"]["timeoutMs"] = longest
    assert user.post("/workflows/execute", body).status_code == 202


# ------------------------------------------------------------------ a slow queue


def test_a_submission_answers_within_seconds_when_sqs_hangs_and_the_sweeper_sends_it(
    user: Api, poller: Any, monkeypatch
):
    """SQS accepts the connection and never answers: the run is stored, the API answers 202
    within a few seconds, and the sweeper sends the stage once SQS is back."""
    capability = unique_capability("hang")
    register_agent(user, capability)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts connections (the kernel does), never reads or answers
    import boto3
    from botocore.config import Config

    from chalicelib import aws

    hung = boto3.client(
        "sqs",
        endpoint_url=f"http://127.0.0.1:{silent.getsockname()[1]}",
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=Config(connect_timeout=1, read_timeout=1, retries={"max_attempts": 1}),
    )
    real_client = aws.aws_client
    monkeypatch.setattr(
        "chalicelib.engine.queue.aws_client",
        lambda service, fast_fail=False: hung if fast_fail else real_client(service),
    )
    started = time.monotonic()
    response = user.post(
        "/workflows/execute",
        {"workflow": {"name": "hang", "stages": chain(capability, "a")}},
    )
    elapsed = time.monotonic() - started
    silent.close()
    assert response.status_code == 202, response.text
    assert elapsed < 8, f"took {elapsed:.1f} s"
    monkeypatch.undo()
    run_ref = response.json()["data"]["workflowRunId"]
    run_id = run_ids.parse_run_ref(run_ref)
    set_stage(run_id, "a", "queued_at = now() - interval '1 hour'")  # as time passes
    assert handlers.sweep_stalled_stages()["requeued"] >= 1
    assert wait_for_run(user, run_ref)["status"] == "completed"


def test_a_scheduled_sweep_in_lambda_runs_rounds_for_its_period_and_bounds_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In Lambda one invocation sweeps every interval until 15 s before the next schedule,
    each round's callbacks bounded (so the last round ends within the function's time)."""
    from chalicelib.config import reset_settings

    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "maof-prod-sweep_stalled_stages")
    monkeypatch.setenv("MAOF_SWEEP_INTERVAL_SECONDS", "1")
    reset_settings()
    monkeypatch.setattr(sweeper, "SCHEDULE_PERIOD_SECONDS", 18.5)  # rounds for 3.5 s
    given: list[float] = []

    def one_round(until: float | None = None) -> dict[str, int]:
        assert until is not None
        given.append(until - time.monotonic())
        return {"requeued": 1}

    monkeypatch.setattr(sweeper, "sweep_once", one_round)
    started = time.monotonic()
    try:
        totals = sweeper.sweep()
    finally:
        monkeypatch.delenv("MAOF_SWEEP_INTERVAL_SECONDS")
        reset_settings()
    assert len(given) == 4 and totals["requeued"] == 4  # at 0, 1, 2 and 3 s
    assert all(9.5 < seconds <= 10 for seconds in given)  # callbacks.TIMEOUT_SECONDS
    assert time.monotonic() - started < 4


class FakeClock:
    """time.monotonic and time.sleep for the sweeper, and a Lambda context on the same
    clock: a sweep of a minute runs in no time."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.monotonic = lambda: self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def context(self, timeout_seconds: float) -> Any:
        ends = self.now + timeout_seconds
        return types.SimpleNamespace(
            get_remaining_time_in_millis=lambda: max(0, int((ends - self.now) * 1000))
        )


@pytest.mark.parametrize(
    ("interval", "function_seconds"),
    [
        ("40", 60),  # a second round at 40 s was given callbacks until 80 s
        ("60", 60),  # docs/deploy.md's cheaper interval: until 60 s, the very end
        ("120", 60),  # one round, given callbacks until 120 s
        ("120", 30),  # the context says when, not an assumed 60 s
        ("120", None),  # no context: the function's timeout from .chalice/config.json
    ],
)
def test_a_scheduled_sweep_in_lambda_ends_its_callbacks_before_the_function_is_stopped(
    monkeypatch: pytest.MonkeyPatch, interval: str, function_seconds: int | None
) -> None:
    """Whatever MAOF_SWEEP_INTERVAL_SECONDS, every round's callbacks (receivers that use
    the whole time they are given) end a margin before Lambda stops the function: a
    callback posted and then killed before its outcome is recorded is posted again after
    its claim, its attempt never counted."""
    import app as maof
    from devstack.poller import scheduled_event

    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "maof-prod-sweep_stalled_stages")
    monkeypatch.setenv("MAOF_SWEEP_INTERVAL_SECONDS", interval)
    reset_settings()
    clock = FakeClock()
    monkeypatch.setattr(sweeper, "time", clock)
    started = clock.now
    rounds: list[tuple[float, float]] = []  # (started at, callbacks until), in seconds

    def one_round(until: float | None = None) -> dict[str, int]:
        assert until is not None
        rounds.append((clock.now - started, until - started))
        if len(rounds) > 1 or int(interval) >= 60:
            clock.now = max(clock.now, until)  # slow receivers use the round's whole time
        return {"callbacks": 1}

    monkeypatch.setattr(sweeper, "sweep_once", one_round)
    context = None if function_seconds is None else clock.context(function_seconds)
    try:
        handler = maof.app.handler_map["sweep_stalled_stages"]
        totals = handler(scheduled_event("sweep_stalled_stages", "us-east-1"), context)
    finally:
        monkeypatch.delenv("MAOF_SWEEP_INTERVAL_SECONDS")
        reset_settings()
    stopped_at = function_seconds or 60  # .chalice/config.json: the stage's lambda_timeout
    assert totals["callbacks"] == len(rounds) >= 1
    assert all(until <= stopped_at - 2 for _, until in rounds), rounds
    assert all(until - at >= 10 for at, until in rounds), rounds  # none starved of time


# ------------------------------------------------------------------ a worker hung mid-transaction


@pytest.fixture
def short_idle_transactions(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Connections on which Postgres ends a transaction left idle for 2 s."""
    monkeypatch.setenv("MAOF_DB_IDLE_IN_TRANSACTION_SECONDS", "2")
    reset_settings()
    db.get_engine.cache_clear()
    yield
    db.get_engine().dispose()
    monkeypatch.undo()
    reset_settings()
    db.get_engine.cache_clear()


def test_a_worker_hung_inside_a_transaction_holds_its_runs_lock_for_seconds_not_hours(
    user: Api, sent, short_idle_transactions
):
    """A worker that stops in the middle of a transaction (a stalled host, a partition)
    holds the run's lock; the other workers of the run wait on it while their leases are
    renewed, so nothing else takes over. Postgres now ends such a session after
    MAOF_DB_IDLE_IN_TRANSACTION_SECONDS, and the run goes on; before, it waited until the
    dead connection's TCP timeout (two hours by default)."""
    capability = unique_capability("hung")
    agent = register_agent(user, capability)
    run_id = submit_direct(user, chain(capability, "a", "b"))
    claimed = stages.claim_stage(run_id, "a")
    assert claimed is not None
    done: list[stages.Completed] = []
    completion = threading.Thread(
        target=lambda: done.append(
            stages.complete_stage(claimed, agent["agentUuid"], agent["agentId"], {}, {"ok": 1})
        ),
        daemon=True,
    )
    with db.get_engine().connect() as hung:  # the hung worker's connection, as any other
        stages.lock_run(Session(bind=hung), run_id)  # …and then it stops
        started = time.monotonic()
        completion.start()
        completion.join(timeout=20)
        waited = time.monotonic() - started
        assert done and done[0].outcome == "completed", f"still waiting after {waited:.0f} s"
        assert 1.5 < waited < 15, waited  # held until Postgres ended the hung session
        with pytest.raises(DBAPIError):  # which finds its connection gone when it wakes
            hung.execute(text("SELECT 1"))
    assert stage_row(run_id, "a").status == "completed"


@pytest.fixture
def api_database_limits(monkeypatch: pytest.MonkeyPatch) -> Any:
    """This process's connections with the API function's database limits (.chalice/
    config.json), as the local API server sets them (limit_database_waits)."""
    from devstack.api import limit_database_waits

    environ: dict[str, str] = {}
    limit_database_waits(environ)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    reset_settings()
    db.reset()  # the engine and its sessions: connections with the limits
    yield environ
    monkeypatch.undo()
    reset_settings()
    db.reset()


def test_a_request_held_by_a_hung_workers_lock_answers_503_within_seconds(
    user: Api, sent, api_database_limits
):
    """A worker hung mid-transaction holds its run's lock until Postgres ends its session
    (MAOF_DB_IDLE_IN_TRANSACTION_SECONDS, 60 s): the API's connections wait on a lock 5 s
    at most, so POST …/cancel answers 503 with Retry-After within seconds, where it waited
    those 60 s, past API Gateway's 29 s (a 504, the function held meanwhile)."""
    assert int(api_database_limits["MAOF_DB_LOCK_TIMEOUT_MS"]) <= 5000
    capability = unique_capability("held")
    register_agent(user, capability)
    run_id = submit_direct(user, chain(capability, "a", "b"))
    cancel = f"/workflows/{run_ids.run_ref(run_id)}/cancel"
    with db.get_engine().connect() as hung:  # the hung worker's connection, as any other
        stages.lock_run(Session(bind=hung), run_id)  # …and then it stops
        started = time.monotonic()
        try:
            response = user.post(cancel)
        except requests.exceptions.ReadTimeout:
            pytest.fail(f"POST {cancel}: no answer within 10 s")
        took = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert response.headers["Retry-After"] == "5"
    assert 4 < took < 8, took  # the lock timeout, not the hung session's end
    assert user.post(cancel).status_code == 202  # the lock free, the retry goes through


def test_a_request_that_finds_no_pooled_connection_free_answers_503_within_seconds(
    user: Api, monkeypatch: pytest.MonkeyPatch, api_database_limits
):
    """Every connection of the API's pool held (requests waiting on a lock, say): the next
    request waited SQLAlchemy's 30 s for one, past API Gateway's 29 s, then answered 500."""
    monkeypatch.setenv("MAOF_DB_POOL_SIZE", "1")
    monkeypatch.setenv("MAOF_DB_MAX_OVERFLOW", "0")
    reset_settings()
    db.reset()
    with db.get_engine().connect():  # the pool's only connection, held
        started = time.monotonic()
        try:
            response = requests.get(
                user.base_url + "/workflows",
                headers={"Authorization": f"Bearer {user.token}"},
                timeout=40,
            )
        except requests.exceptions.ReadTimeout:
            pytest.fail("GET /workflows: no answer within 40 s")
        took = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert response.headers["Retry-After"] == "5"
    assert took < 8, took  # the API's pool timeout, well within API Gateway's 29 s
    assert user.get("/workflows").status_code == 200


def test_an_api_statement_past_the_statement_timeout_answers_503(
    user: Api, monkeypatch: pytest.MonkeyPatch, api_database_limits
):
    """Postgres cancels an API statement that runs past MAOF_DB_STATEMENT_TIMEOUT_MS
    (15 s deployed, below API Gateway's 29 s; here 1 s): the request answers 503 with
    Retry-After, not a 504 or a 500."""
    assert int(api_database_limits["MAOF_DB_STATEMENT_TIMEOUT_MS"]) < 29_000
    monkeypatch.setenv("MAOF_DB_STATEMENT_TIMEOUT_MS", "1000")
    reset_settings()
    db.reset()
    from chalicelib.workflows import stats

    def slow_stats(principal: Any) -> Any:
        with session_scope() as session:
            session.execute(text("SELECT pg_sleep(3)"))
        raise AssertionError("the statement ran past its timeout")

    monkeypatch.setattr(stats, "stats", slow_stats)
    started = time.monotonic()
    response = user.get("/stats")
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "5"
    assert time.monotonic() - started < 2.5
