"""At-least-once delivery against the real database: duplicates change nothing, a dead
worker or a lost message never strands a run, and the audit trail cannot be rewritten."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError, OperationalError

from chalicelib.agents.selection import AgentsBusy
from chalicelib.config import get_settings, reset_settings
from chalicelib.core import api as run_ids
from chalicelib.core.api import Principal
from chalicelib.db import session_scope
from chalicelib.db.models import AuditEntry, StageExecution
from chalicelib.engine import handlers, stages
from chalicelib.engine.queue import MAX_RECEIVES
from chalicelib.workflows import runs
from chalicelib.workflows.definition import ExecuteRequest
from tests.integration.conftest import (
    SentMessages,
    end_app_sessions,
    owner_connection,
    register_agent,
    set_read_only,
    unique_capability,
    wait_for_run,
    wait_until,
)


def principal_of(client: Any) -> Principal:
    return Principal(uuid.UUID(client.user["userUuid"]), client.user["email"], "user")


def submit_direct(client: Any, stages_: list[dict[str, Any]]) -> uuid.UUID:
    body = ExecuteRequest.model_validate({"workflow": {"name": "delivery", "stages": stages_}})
    reply = runs.submit(principal_of(client), body)
    return run_ids.parse_run_ref(reply.data.workflow_run_id)


def record(run_id: uuid.UUID, stage_id: str) -> dict[str, Any]:
    return {
        "messageId": str(uuid.uuid4()),
        "receiptHandle": "test",
        "body": json.dumps({"runId": str(run_id), "stageId": stage_id}),
    }


def deliver_concurrently(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    barrier = threading.Barrier(len(records))
    results: list[dict[str, Any]] = []

    def worker(item: dict[str, Any]) -> None:
        barrier.wait()
        results.append(handlers.run_stage_batch([item]))

    threads = [threading.Thread(target=worker, args=(r,)) for r in records]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def audit_actions(run_id: uuid.UUID) -> list[tuple[str, str | None]]:
    with session_scope() as session:
        entries = session.scalars(
            select(AuditEntry).where(AuditEntry.run_id == run_id).order_by(AuditEntry.seq)
        ).all()
    return [(e.action, e.stage_id) for e in entries]


def stage_row(run_id: uuid.UUID, stage_id: str) -> StageExecution:
    with session_scope() as session:
        row = session.scalar(
            select(StageExecution).where(
                StageExecution.run_id == run_id, StageExecution.stage_id == stage_id
            )
        )
    assert row is not None
    return row


def chain(capability: str, *ids: str) -> list[dict[str, Any]]:
    return [
        {
            "id": sid,
            "name": sid,
            "agentCapability": capability,
            "dependencies": [ids[i - 1]] if i else [],
        }
        for i, sid in enumerate(ids)
    ]


def stalled_then_swept(client: Any, run_id: uuid.UUID, past: str, stage_id: str | None = None):
    """Time passes (`past`: an assignment backdating the run's stage rows, or one of them),
    the sweeper runs and re-queues something; returns the run once it has ended."""
    where = "run_id = :r" + (" AND stage_id = :s" if stage_id else "")
    with session_scope() as session:
        session.execute(
            text(f"UPDATE stage_executions SET {past} WHERE {where}"),
            {"r": run_id, "s": stage_id},
        )
    assert handlers.sweep_stalled_stages()["requeued"] >= 1
    return wait_for_run(client, run_ids.run_ref(run_id))


def test_duplicate_delivery_runs_stage_once(user, sent):
    capability = unique_capability("dup")
    register_agent(user, capability)
    run_id = submit_direct(user, chain(capability, "a", "b"))
    message = record(run_id, "a")
    first = handlers.run_stage_batch([message])
    second = handlers.run_stage_batch([message])
    assert first == second == {"batchItemFailures": []}
    assert audit_actions(run_id) == [("submit", None), ("execute", "a")]
    assert sent.sent == [(run_id, "a"), (run_id, "b")]  # the root at submit, b exactly once
    assert stage_row(run_id, "a").attempt == 1


def test_concurrent_duplicate_deliveries_produce_one_output_one_entry_one_message(user, sent):
    capability = unique_capability("race")
    register_agent(user, capability)
    run_id = submit_direct(user, chain(capability, "a", "b"))
    message = record(run_id, "a")
    results = deliver_concurrently([message] * 8)
    assert results == [{"batchItemFailures": []}] * 8
    assert audit_actions(run_id).count(("execute", "a")) == 1
    assert sent.sent.count((run_id, "b")) == 1
    assert stage_row(run_id, "a").attempt == 1


def test_fan_in_stage_is_queued_exactly_once_when_branches_finish_together(user, sent):
    capability = unique_capability("fanin")
    register_agent(user, capability)
    for _ in range(5):
        sent.sent.clear()
        run_id = submit_direct(
            user,
            [
                {"id": "a", "name": "A", "agentCapability": capability},
                *[
                    {"id": b, "name": b, "agentCapability": capability, "dependencies": ["a"]}
                    for b in ("b1", "b2", "b3", "b4")
                ],
                {
                    "id": "d",
                    "name": "D",
                    "agentCapability": capability,
                    "dependencies": ["b1", "b2", "b3", "b4"],
                },
            ],
        )
        handlers.run_stage_batch([record(run_id, "a")])
        deliver_concurrently([record(run_id, b) for b in ("b1", "b2", "b3", "b4")] * 2)
        assert sent.sent.count((run_id, "d")) == 1
        assert stage_row(run_id, "d").status == "queued"


def test_worker_killed_between_claim_and_completion_is_recovered_by_the_sweeper(
    user, poller, monkeypatch
):
    capability = unique_capability("killed")
    register_agent(user, capability)
    lost = SentMessages()
    monkeypatch.setattr(runs, "send_stage_messages", lost)  # keep the poller off stage a
    run_id = submit_direct(user, chain(capability, "a", "b"))
    dead_worker = stages.claim_stage(run_id, "a")
    assert dead_worker is not None
    # The worker dies; time passes until its lease is over.
    run = stalled_then_swept(user, run_id, "lease_expires_at = now() - interval '1 second'", "a")
    assert run["status"] == "completed", run
    # A redelivery of the same attempt: the agent sees the same Idempotency-Key.
    assert stage_row(run_id, "a").attempt == 1
    actions = audit_actions(run_id)
    assert ("requeue", "a") in actions
    assert actions.count(("execute", "a")) == 1
    # The "dead" worker wakes up and tries to finish: nothing changes.
    output_before = stage_row(run_id, "a").output
    assert stages.complete_stage(dead_worker, str(uuid.uuid4()), "ghost", {}, {"late": True}) == (
        stages.Completed(outcome="lost")
    )
    assert stage_row(run_id, "a").output == output_before
    assert audit_actions(run_id) == actions


def test_message_lost_between_commit_and_send_is_recovered_by_the_sweeper(
    user, poller, monkeypatch
):
    capability = unique_capability("lost")
    register_agent(user, capability)

    def crash(run_id: uuid.UUID, stage_ids: list[str], **_: Any) -> None:
        raise ConnectionError("SQS unreachable")

    monkeypatch.setattr(runs, "send_stage_messages", crash)
    response = user.post(
        "/workflows/execute",
        {"workflow": {"name": "lost", "stages": chain(capability, "a", "b")}},
    )
    assert response.status_code == 202  # accepted: the run is stored, the sweeper sends it
    run_ref = response.json()["data"]["workflowRunId"]
    run_id = run_ids.parse_run_ref(run_ref)
    assert stage_row(run_id, "a").status == "queued"
    run = stalled_then_swept(user, run_id, "queued_at = now() - interval '1 hour'")
    assert run["status"] == "completed", run
    assert ("requeue", "a") in audit_actions(run_id)


def test_a_malformed_message_goes_to_the_dead_letter_queue_not_round_and_round(monkeypatch):
    changed: list[Any] = []
    monkeypatch.setattr(handlers, "change_visibility", changed.extend)
    bad = {"messageId": "m-1", "receiptHandle": "x", "body": "not json"}
    assert handlers.run_stage_batch([bad]) == {"batchItemFailures": [{"itemIdentifier": "m-1"}]}
    # Visible again at once: its few receives (maxReceiveCount) take it to the DLQ quickly.
    assert changed == [("x", 0)]


@pytest.mark.parametrize("body", ["[" * 100_000, None, 42])
def test_a_malformed_body_fails_its_own_record_and_no_other(user, sent, monkeypatch, body):
    """JSON nested past the recursion limit raised RecursionError out of the batch: every
    record of it came back after the queue's visibility timeout (90 min deployed)."""
    changed: list[Any] = []
    monkeypatch.setattr(handlers, "change_visibility", changed.extend)
    capability = unique_capability("poison")
    register_agent(user, capability)
    run_id = submit_direct(user, chain(capability, "a"))
    poison = {"messageId": "poison", "receiptHandle": "p", "body": body}
    result = handlers.run_stage_batch([poison, record(run_id, "a")])
    assert result == {"batchItemFailures": [{"itemIdentifier": "poison"}]}
    assert changed == [("p", 0)]
    assert stage_row(run_id, "a").status == "completed"


def test_a_failed_record_comes_back_within_seconds_doubling_with_each_receive():
    body = json.dumps({"runId": str(uuid.uuid4()), "stageId": "a"})
    delays = [
        handlers.redelivery_delay(
            {"body": body, "attributes": {"ApproximateReceiveCount": str(receives)}}
        )
        for receives in (1, 2, 3, 4, 5, 6, 50)
    ]
    assert delays == [1, 2, 4, 8, 16, 20, 20]


def test_a_database_outage_of_five_minutes_sends_no_stage_message_to_the_dead_letter_queue():
    """Handed back at each receive during an outage, a stage's message reaches the DLQ
    (whose alarm says: malformed, purge it) only after MAX_RECEIVES receives; at 5 it did
    after some 35 s of outage, shorter than a database failover."""
    body = json.dumps({"runId": str(uuid.uuid4()), "stageId": "a"})
    waited = sum(
        handlers.redelivery_delay({"body": body, "attributes": {"ApproximateReceiveCount": n}})
        for n in range(1, MAX_RECEIVES)
    )
    assert waited >= 300


def test_a_stage_that_raises_unexpectedly_is_retried_under_its_retries_then_failed(
    user, sent, monkeypatch
):
    capability = unique_capability("boom")
    register_agent(user, capability)
    run_id = submit_direct(user, chain(capability, "a"))
    with session_scope() as session:  # no backoff, one retry
        session.execute(
            text(
                'UPDATE stage_executions SET config = \'{"retries": 1, "backoffMs": 0}\' '
                "WHERE run_id = :r"
            ),
            {"r": run_id},
        )

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug after the agent answered")

    monkeypatch.setattr(stages, "complete_stage", broken)
    message = record(run_id, "a")
    assert handlers.run_stage_batch([message]) == {"batchItemFailures": []}  # not redelivered
    row = stage_row(run_id, "a")
    assert (row.status, row.errors, row.attempt) == ("queued", 1, 1)  # retried, same key
    assert sent.sent.count((run_id, "a")) == 2  # at submission, and for the retry
    assert handlers.run_stage_batch([message]) == {"batchItemFailures": []}
    row = stage_row(run_id, "a")
    assert row.status == "failed"
    assert "RuntimeError: a bug after the agent answered" in (row.error_message or "")
    run = user.get(f"/workflows/{run_ids.run_ref(run_id)}").json()["data"]
    assert run["status"] == "failed"
    assert "internal error" in run["errorMessage"]


def _one_entry_id(user: Any, sent: SentMessages) -> tuple[uuid.UUID, int]:
    capability = unique_capability("tamper")
    register_agent(user, capability)
    run_id = submit_direct(user, chain(capability, "a"))
    handlers.run_stage_batch([record(run_id, "a")])
    with session_scope() as session:
        entry_id = session.scalar(
            select(AuditEntry.id).where(AuditEntry.run_id == run_id, AuditEntry.action == "execute")
        )
    assert entry_id is not None
    return run_id, entry_id


APP_ROLE_REFUSED = [
    "UPDATE execution_logs SET status = 'tampered' WHERE id = :id",
    "DELETE FROM execution_logs WHERE id = :id",
    "TRUNCATE execution_logs",
    "ALTER TABLE execution_logs DISABLE TRIGGER execution_logs_no_update_delete",
    "ALTER TABLE execution_logs DISABLE TRIGGER ALL",
]


@pytest.mark.parametrize("statement", APP_ROLE_REFUSED)
def test_the_application_role_cannot_rewrite_audit_history(user, sent, statement):
    _, entry_id = _one_entry_id(user, sent)
    with pytest.raises(DBAPIError, match=r"permission denied|must be owner"):
        with session_scope() as session:  # the application's role (MAOF_DATABASE_URL)
            session.execute(text(statement), {"id": entry_id})


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE execution_logs SET status = 'tampered' WHERE id = :id",
        "DELETE FROM execution_logs WHERE id = :id",
        "TRUNCATE execution_logs",
    ],
)
def test_even_the_owner_is_refused_by_the_append_only_trigger(user, sent, statement):
    _, entry_id = _one_entry_id(user, sent)
    with pytest.raises(DBAPIError, match="append-only"):
        with owner_connection() as conn:
            conn.execute(text(statement), {"id": entry_id})


def test_a_row_altered_behind_the_triggers_back_breaks_the_chain(user, sent):
    run_id, entry_id = _one_entry_id(user, sent)
    ref = run_ids.run_ref(run_id)
    assert user.get(f"/workflows/{ref}/audit").json()["data"]["chain"]["valid"] is True
    with owner_connection() as conn:  # only the owner can disable the trigger
        conn.execute(
            text("ALTER TABLE execution_logs DISABLE TRIGGER execution_logs_no_update_delete")
        )
        conn.execute(
            text("UPDATE execution_logs SET agent_id = 'forged' WHERE id = :id"), {"id": entry_id}
        )
        conn.execute(
            text("ALTER TABLE execution_logs ENABLE TRIGGER execution_logs_no_update_delete")
        )
    chain_status = user.get(f"/workflows/{ref}/audit").json()["data"]["chain"]
    assert chain_status["valid"] is False
    assert chain_status["brokenAtSeq"] == 2


# ------------------------------------------------------------------ eager dispatch
# A completion runs the first stage it made ready in the same invocation (no queue hop);
# the others, and all of them past the hand-off budget, go through SQS.


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> SentMessages:
    """Sends recorded, not sent, with eager dispatch as configured (on by default)."""
    recorder = SentMessages()
    monkeypatch.setattr(runs, "send_stage_messages", recorder)
    monkeypatch.setattr(handlers, "send_stage_messages", recorder)
    return recorder


def test_a_ready_stage_runs_in_the_invocation_that_completed_the_one_before(user, recorded):
    capability = unique_capability("eager")
    register_agent(user, capability)
    run_id = submit_direct(user, chain(capability, "a", "b", "c"))
    assert handlers.run_stage_batch([record(run_id, "a")]) == {"batchItemFailures": []}
    # One message (the submission's); b and c ran in a's invocation, which waited for them.
    assert recorded.sent == [(run_id, "a")]
    assert audit_actions(run_id) == [
        ("submit", None),
        ("execute", "a"),
        ("execute", "b"),
        ("execute", "c"),
        ("complete", None),
    ]
    # A late duplicate of b's message (a sweeper's re-send) finds it done: nothing happens.
    assert handlers.run_stage(run_id, "b") == "not-queued"
    assert stage_row(run_id, "b").attempt == 1
    assert audit_actions(run_id).count(("execute", "b")) == 1


def test_of_a_fan_out_one_stage_runs_here_and_the_others_are_queued(user, recorded):
    capability = unique_capability("eagerfan")
    register_agent(user, capability)
    branches = ("b1", "b2", "b3")
    run_id = submit_direct(
        user,
        [
            {"id": "a", "name": "A", "agentCapability": capability},
            *[
                {"id": b, "name": b, "agentCapability": capability, "dependencies": ["a"]}
                for b in branches
            ],
        ],
    )
    handlers.run_stage_batch([record(run_id, "a")])
    statuses = {b: stage_row(run_id, b).status for b in branches}
    ran_here = [b for b, status in statuses.items() if status == "completed"]
    assert len(ran_here) == 1, statuses
    queued = sorted(b for b in branches if b not in ran_here)
    assert sorted(s for r, s in recorded.sent if s != "a") == queued
    assert all(statuses[b] == "queued" for b in queued)


def test_past_the_hand_off_budget_a_ready_stage_goes_through_sqs(user, recorded, monkeypatch):
    monkeypatch.setattr(handlers, "HANDOFF_BUDGET_SECONDS", -1.0)  # every invocation is past it
    capability = unique_capability("eagerlate")
    register_agent(user, capability)
    run_id = submit_direct(user, chain(capability, "a", "b"))
    handlers.run_stage_batch([record(run_id, "a")])
    assert recorded.sent == [(run_id, "a"), (run_id, "b")]
    assert stage_row(run_id, "b").status == "queued"


def test_with_eager_dispatch_off_every_ready_stage_goes_through_sqs(user, recorded, monkeypatch):
    monkeypatch.setenv("MAOF_EAGER_DISPATCH", "false")
    reset_settings()
    try:
        capability = unique_capability("eageroff")
        register_agent(user, capability)
        run_id = submit_direct(user, chain(capability, "a", "b"))
        handlers.run_stage_batch([record(run_id, "a")])
    finally:
        monkeypatch.delenv("MAOF_EAGER_DISPATCH")
        reset_settings()
    assert recorded.sent == [(run_id, "a"), (run_id, "b")]
    assert stage_row(run_id, "b").status == "queued"


def test_a_ready_stage_whose_claim_fails_is_sent_instead(user, recorded, monkeypatch):
    capability = unique_capability("eagerdb")
    register_agent(user, capability)
    run_id = submit_direct(user, chain(capability, "a", "b"))
    claim = stages.claim_stage

    def claim_a_only(run: uuid.UUID, stage_id: str, **kwargs: Any) -> Any:
        if stage_id == "b":
            raise OperationalError("UPDATE …", {}, Exception("server closed the connection"))
        return claim(run, stage_id, **kwargs)

    monkeypatch.setattr(stages, "claim_stage", claim_a_only)
    assert handlers.run_stage_batch([record(run_id, "a")]) == {"batchItemFailures": []}
    assert recorded.sent == [(run_id, "a"), (run_id, "b")]
    assert stage_row(run_id, "a").status == "completed"
    assert stage_row(run_id, "b").status == "queued"


def test_a_stage_run_here_that_the_database_fails_is_handed_back_and_sent(
    user, recorded, monkeypatch
):
    """A stage taken on without a message (eager dispatch, a hand-off) that the database
    fails is handed back (queued, uncounted) as a message-borne one is; but no message
    would bring it back: it was left to the sweeper, counted as a lost message (enough of
    those fail a healthy run)."""
    capability = unique_capability("eagerblip")
    register_agent(user, capability)
    run_id = submit_direct(user, chain(capability, "a", "b"))
    complete = stages.complete_stage

    def blip_b(stage: stages.ClaimedStage, *args: Any, **kwargs: Any) -> Any:
        if stage.stage_id == "b":
            raise OperationalError("COMMIT", {}, Exception("server closed the connection"))
        return complete(stage, *args, **kwargs)

    monkeypatch.setattr(stages, "complete_stage", blip_b)
    assert handlers.run_stage_batch([record(run_id, "a")]) == {"batchItemFailures": []}
    assert stage_row(run_id, "b").status == "queued"
    assert stage_row(run_id, "b").requeues == 0
    assert recorded.sent == [(run_id, "a"), (run_id, "b")]


def test_no_pooled_connection_in_time_is_not_the_stages_fault(user, sent, monkeypatch):
    """Every pooled connection taken (workers waiting on a run's lock behind a hung
    transaction): the stage is handed back uncounted, as for a lost connection. It was
    counted as the stage's error: a stage with no retries failed its run."""
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    capability = unique_capability("pool")
    register_agent(user, capability)
    run_id = submit_direct(user, [dict(chain(capability, "a")[0], config={"retries": 0})])
    assign = stages.assign_agent
    calls = []

    def exhausted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise PoolTimeout("QueuePool limit of size 10 overflow 10 reached")
        return assign(*args, **kwargs)

    monkeypatch.setattr(stages, "assign_agent", exhausted)
    failures = handlers.run_stage_batch([record(run_id, "a")])["batchItemFailures"]
    assert len(failures) == 1, "handed back to SQS, as any database failure"
    row = stage_row(run_id, "a")
    assert (row.status, row.errors) == ("queued", 0)
    # Due when its message is visible again (a second later, at its first receive).
    wait_until(lambda: stages.seconds_until_due(run_id, "a") is None, timeout=5)
    assert handlers.run_stage_batch([record(run_id, "a")]) == {"batchItemFailures": []}
    assert stage_row(run_id, "a").status == "completed"


def test_a_failover_to_a_read_only_node_as_a_stage_completes_is_not_the_stages_fault(
    user, sent, monkeypatch
):
    """The agent answered; the completion lands on a read-only node (a failover), writable
    again a moment later. Postgres refuses the write (ReadOnlySqlTransaction, not an
    OperationalError): it was counted as the stage's error, and a stage with no retries
    failed its run with the statement's SQL in its message."""
    capability = unique_capability("readonly")
    register_agent(user, capability)
    run_id = submit_direct(user, [dict(chain(capability, "a")[0], config={"retries": 0})])
    complete = stages.complete_stage
    calls: list[int] = []

    def on_a_read_only_node(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) > 1:
            return complete(*args, **kwargs)
        set_read_only(True)
        end_app_sessions()
        try:
            return complete(*args, **kwargs)
        finally:
            set_read_only(False)
            end_app_sessions()

    monkeypatch.setattr(stages, "complete_stage", on_a_read_only_node)
    failures = handlers.run_stage_batch([record(run_id, "a")])["batchItemFailures"]
    assert len(failures) == 1, "handed back to SQS, as any database failure"
    row = stage_row(run_id, "a")
    assert (row.status, row.errors) == ("queued", 0), row.error_message
    # Due when its message is visible again (a second later, at its first receive).
    wait_until(lambda: stages.seconds_until_due(run_id, "a") is None, timeout=5)
    assert handlers.run_stage_batch([record(run_id, "a")]) == {"batchItemFailures": []}
    assert stage_row(run_id, "a").status == "completed"


def test_worker_connections_opened_on_a_read_only_node_are_replaced_once_a_write_fails(user, sent):
    """The pool's connections opened during a failover, on the read-only node, pass the
    pre-ping once the database is writable again: every claim on them failed (the message
    handed back each time) until pool_recycle (300 s). The first refusal now drops them."""
    capability = unique_capability("reader")
    register_agent(user, capability)
    run_id = submit_direct(user, chain(capability, "a"))
    set_read_only(True)
    end_app_sessions()
    try:
        stage_row(run_id, "a")  # a connection on the reader
    finally:
        set_read_only(False)  # new sessions are writable; the pooled one is not
    first = handlers.run_stage_batch([record(run_id, "a")])
    assert len(first["batchItemFailures"]) == 1, "its claim refused on the reader's connection"
    assert handlers.run_stage_batch([record(run_id, "a")]) == {"batchItemFailures": []}
    assert stage_row(run_id, "a").status == "completed"


def test_a_database_error_counted_against_a_stage_stores_no_sql(user, sent, monkeypatch):
    """An error of Postgres that is the work's own (an output it refused) fails the stage
    naming the driver's words: SQLAlchemy's message added the statement's SQL text."""
    from sqlalchemy.exc import DataError

    capability = unique_capability("nosql")
    register_agent(user, capability)
    run_id = submit_direct(user, [dict(chain(capability, "a")[0], config={"retries": 0})])

    def refused(*args: Any, **kwargs: Any) -> Any:
        orig = Exception("invalid input syntax for type json")
        raise DataError("UPDATE stage_executions SET output = %(output)s", {}, orig)

    monkeypatch.setattr(stages, "complete_stage", refused)
    assert handlers.run_stage_batch([record(run_id, "a")]) == {"batchItemFailures": []}
    row = stage_row(run_id, "a")
    assert row.status == "failed"
    assert "DataError: invalid input syntax for type json" in (row.error_message or "")
    assert "UPDATE" not in (row.error_message or ""), row.error_message


def _pool_exhausted(*_: Any, **__: Any) -> Any:
    raise OperationalError("SELECT 1", {}, Exception("QueuePool limit reached"))


def _fails_at_once(patched: pytest.MonkeyPatch) -> None:
    patched.setattr(stages, "load_context", _pool_exhausted)


def _fails_after_a_capacity_wait(patched: pytest.MonkeyPatch) -> None:
    """Every agent full at first: the stage parks, finds room on its second look and is
    taken back under a new claim, which the database then fails."""
    looks: list[bool] = []

    def busy_then_unavailable(*_: Any, **__: Any) -> Any:
        looks.append(True)
        if len(looks) == 1:
            raise AgentsBusy("every agent with the capability is at capacity")
        _pool_exhausted()

    patched.setattr(handlers, "_select_and_assign", busy_then_unavailable)


@pytest.mark.parametrize(
    "fail", [_fails_at_once, _fails_after_a_capacity_wait], ids=["at once", "after a wait"]
)
def test_a_message_handed_back_is_not_resent_by_the_sweeper_before_it_comes_back(
    user, sent, monkeypatch, nothing_else_stalled, fail
):
    """The database fails a worker after its claim: the stage is released (queued) and its
    message handed back, visible again after 2^(receives-1) s, up to 20 s. In flight, SQS
    leaves it out of the queue's depth, so from the 5th receive (16 s) the sweeper's 10 s
    passed first and it re-sent the stage, counted as a lost message: a database outage
    failed runs with 'message lost'. The stage is due again only when its message is, also
    when taken back under a new claim after a capacity wait (that one released it due at
    once)."""
    from chalicelib.engine import sweeper

    capability = unique_capability("handback")
    register_agent(user, capability)
    run_id = submit_direct(user, chain(capability, "a"))
    message = dict(record(run_id, "a"), attributes={"ApproximateReceiveCount": "6"})
    assert handlers.redelivery_delay(message) == handlers.MAX_REDELIVERY_DELAY_SECONDS

    with monkeypatch.context() as patched:
        fail(patched)
        assert len(handlers.run_stage_batch([message])["batchItemFailures"]) == 1
    with session_scope() as session:
        due_in = session.execute(
            text(
                "SELECT extract(epoch FROM not_before - now()) FROM stage_executions "
                "WHERE run_id = :r"
            ),
            {"r": run_id},
        ).scalar_one()
    assert due_in > handlers.MAX_REDELIVERY_DELAY_SECONDS - 5, due_in
    assert (stage_row(run_id, "a").status, stage_row(run_id, "a").requeues) == ("queued", 0)
    monkeypatch.setattr(sweeper, "send_stage_messages", sent)
    monkeypatch.setattr(sweeper, "queue_backlog", lambda: 0)  # the message is in flight
    past_grace = get_settings().sweep_queued_after_seconds + 1
    stalled = f"queued_at = now() - make_interval(secs => {past_grace})"
    with session_scope() as session:  # the grace has passed; the message is 9 s away
        session.execute(
            text(f"UPDATE stage_executions SET {stalled} WHERE run_id = :r"), {"r": run_id}
        )
    sweeper.sweep_once()
    row = stage_row(run_id, "a")
    assert (row.status, row.requeues) == ("queued", 0), audit_actions(run_id)
    # at submission only (the sweep may re-send stages other tests left behind)
    assert [hop for hop in sent.sent if hop[0] == run_id] == [(run_id, "a")]
    # 20 s on, the message comes back: due, it runs.
    with session_scope() as session:
        session.execute(
            text(
                "UPDATE stage_executions SET queued_at = queued_at - interval '20 seconds', "
                "not_before = not_before - interval '20 seconds' WHERE run_id = :r"
            ),
            {"r": run_id},
        )
    assert handlers.run_stage_batch([message]) == {"batchItemFailures": []}
    assert stage_row(run_id, "a").status == "completed"


def test_a_ready_stage_that_cannot_be_started_here_is_released_and_sent(
    user, recorded, monkeypatch
):
    capability = unique_capability("eagerspawn")
    register_agent(user, capability)
    run_id = submit_direct(user, chain(capability, "a", "b"))

    def pool_gone(self: Any, task: Any) -> None:
        raise RuntimeError("cannot schedule new futures after shutdown")

    monkeypatch.setattr(handlers.TaskGroup, "spawn", pool_gone)
    assert handlers.run_stage_batch([record(run_id, "a")]) == {"batchItemFailures": []}
    assert recorded.sent == [(run_id, "a"), (run_id, "b")]
    b = stage_row(run_id, "b")
    assert (b.status, b.claim_token, b.attempt) == ("queued", None, 1)  # claimed, handed back


def test_a_task_the_pool_refuses_is_not_waited_for(monkeypatch):
    class Refusing:
        def submit(self, *_: Any) -> None:
            raise RuntimeError("cannot schedule new futures after shutdown")

    monkeypatch.setattr(handlers, "_batch_pool", Refusing)
    group = handlers.TaskGroup()
    with pytest.raises(RuntimeError):
        group.spawn(lambda: None)
    done = threading.Event()
    threading.Thread(target=lambda: (group.wait(), done.set()), daemon=True).start()
    assert done.wait(5), "wait() hung on a task that never started"


def test_a_worker_that_dies_between_the_completion_and_the_claim_is_covered_by_the_sweeper(
    user, poller, monkeypatch
):
    capability = unique_capability("eagerdead")
    register_agent(user, capability)
    monkeypatch.setattr(runs, "send_stage_messages", SentMessages())  # a: delivered by hand
    died = SentMessages()
    monkeypatch.setattr(
        handlers, "_dispatch", lambda completed, ready, _: died(completed.run_id, ready)
    )
    run_id = submit_direct(user, chain(capability, "a", "b"))
    handlers.run_stage_batch([record(run_id, "a")])
    assert died.sent == [(run_id, "b")]  # committed ready, then the worker was gone
    assert stage_row(run_id, "b").status == "queued"
    monkeypatch.undo()
    run = stalled_then_swept(user, run_id, "queued_at = now() - interval '1 hour'", "b")
    assert run["status"] == "completed", run
    assert ("requeue", "b") in audit_actions(run_id)
