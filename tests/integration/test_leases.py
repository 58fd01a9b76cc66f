"""Lease renewals never wait on a stage row another transaction holds (a completion,
mostly): they renew the others and take the held one at the next renewal. A worker whose
claim was taken over writes and counts nothing; one whose lease ran out but whose stage
no other worker has claimed yet still ends it with its agent's answer."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
from sqlalchemy import text

from chalicelib.agents.dispatch import AgentCallFailed, AgentOutput
from chalicelib.agents.failure import Failure
from chalicelib.db import session_scope
from chalicelib.engine import handlers, stages, sweeper
from tests.integration.conftest import register_agent, unique_capability
from tests.integration.test_delivery import (
    audit_actions,
    chain,
    record,
    stage_row,
    submit_direct,
)
from tests.integration.test_observability import by_metric, emf_lines


def _lease_of(claimed: stages.ClaimedStage) -> Any:
    with session_scope() as session:
        return session.execute(
            text("SELECT lease_expires_at FROM stage_executions WHERE id = :id"),
            {"id": claimed.id},
        ).scalar_one()


def test_a_renewal_skips_a_stage_row_held_by_another_transaction(user: Any, sent: Any) -> None:
    capability = unique_capability("renew")
    register_agent(user, capability)
    first, second = (
        stages.claim_stage(submit_direct(user, chain(capability, "a")), "a") for _ in range(2)
    )
    assert first is not None and second is not None
    before = _lease_of(second)
    renewed: list[int] = []
    with session_scope() as holder:  # a completion of the first stage, in flight
        holder.execute(
            text("SELECT id FROM stage_executions WHERE id = :id FOR UPDATE"), {"id": first.id}
        )
        renewal = threading.Thread(
            target=lambda: renewed.append(
                stages.renew_leases([first.claim_token, second.claim_token])
            )
        )
        renewal.start()
        renewal.join(timeout=10)
        assert not renewal.is_alive(), "the renewal waited on the held row"
    assert renewed == [1]
    assert _lease_of(second) > before
    assert stages.renew_leases([first.claim_token, second.claim_token]) == 2


def _taken_over(run_id: uuid.UUID, stage_id: str) -> None:
    """Another worker's claim on the stage, as after our lease ran out: a new token."""
    with session_scope() as session:
        session.execute(
            text(
                "UPDATE stage_executions SET claim_token = gen_random_uuid(), "
                "lease_expires_at = now() + interval '1 minute' "
                "WHERE run_id = :run_id AND stage_id = :stage_id"
            ),
            {"run_id": run_id, "stage_id": stage_id},
        )


@pytest.mark.parametrize("answer", ["output", "final error"])
def test_a_worker_whose_claim_was_taken_over_meanwhile_writes_and_counts_nothing(
    user: Any,
    sent: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    answer: str,
) -> None:
    """A worker that paused past its lease (a stalled host) and then got its agent's answer:
    the stage is another worker's now. Before, its completion wrote nothing but still
    counted the stage as finished (StagesFinished, StageDuration), once per stale worker."""
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    capability = unique_capability("stale")
    register_agent(user, capability)
    run_id = submit_direct(user, chain(capability, "a", "b"))

    def agent_answers_after_the_takeover(*args: Any, **kwargs: Any) -> AgentOutput:
        _taken_over(run_id, "a")
        if answer == "final error":
            raise AgentCallFailed("BROKEN", failure=Failure.AGENT_FINAL, code="BROKEN")
        return AgentOutput({"late": True}, '{"late": true}')

    monkeypatch.setattr(handlers, "call_agent", agent_answers_after_the_takeover)
    capsys.readouterr()
    assert handlers.run_stage(run_id, "a") == "lost"
    metrics = by_metric(emf_lines(capsys.readouterr().out))
    assert "StagesFinished" not in metrics and "StageDuration" not in metrics, sorted(metrics)
    row = stage_row(run_id, "a")
    assert (row.status, row.output, row.error_message) == ("in_progress", None, None)
    assert stage_row(run_id, "b").status == "pending"
    assert [action for action, _ in audit_actions(run_id)] == ["submit"]


def _lease_ran_out_and_swept(run_id: uuid.UUID, stage_id: str) -> None:
    """The worker's renewals were late (a pause, a database blip): its lease ran out and
    the sweeper queued the stage again (its message is the caller's to deliver)."""
    with session_scope() as session:
        session.execute(
            text(
                "UPDATE stage_executions SET lease_expires_at = now() - interval '1 second' "
                "WHERE run_id = :run_id AND stage_id = :stage_id"
            ),
            {"run_id": run_id, "stage_id": stage_id},
        )
    swept = sweeper.sweep_run(run_id, [stage_id], sweeper.grace_for(0))
    assert swept.requeued == [stage_id]
    assert stage_row(run_id, stage_id).status == "queued"


@pytest.mark.parametrize("answer", ["output", "final error"])
def test_a_late_worker_whose_requeued_stage_no_one_claimed_yet_ends_it_with_its_answer(
    user: Any, sent: Any, monkeypatch: pytest.MonkeyPatch, answer: str
) -> None:
    """The sweeper re-queued the stage of a worker that was slow, not dead; its agent then
    answers before any other worker has claimed the stage: the answer is kept, and the
    re-sent message finds the stage done. The answer used to be thrown away and the agent
    called again for the same attempt."""
    capability = unique_capability("late")
    register_agent(user, capability)
    run_id = submit_direct(user, chain(capability, "a"))
    calls: list[int] = []

    def agent_answers_after_the_sweep(*args: Any, **kwargs: Any) -> AgentOutput:
        calls.append(1)
        _lease_ran_out_and_swept(run_id, "a")
        if answer == "final error":
            raise AgentCallFailed("BROKEN", failure=Failure.AGENT_FINAL, code="BROKEN")
        return AgentOutput({"late": True}, '{"late": true}')

    monkeypatch.setattr(handlers, "call_agent", agent_answers_after_the_sweep)
    outcome = "completed" if answer == "output" else "failed"
    assert handlers.run_stage(run_id, "a") == outcome
    row = stage_row(run_id, "a")
    assert (row.status, row.lease_expires_at) == (outcome, None)
    assert handlers.run_stage_batch([record(run_id, "a")]) == {"batchItemFailures": []}
    assert calls == [1], "the re-sent message called the agent again"
    ended = [("execute", "a"), ("complete", None)] if answer == "output" else [("fail", "a")]
    assert audit_actions(run_id) == [("submit", None), ("requeue", "a"), *ended]


def test_a_late_worker_whose_requeued_stage_another_worker_claimed_changes_nothing(
    user: Any, sent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweeper's re-queue keeps the late worker's claim only until another worker claims
    the stage: after that, the late answer writes nothing, and the stage is the other's."""
    capability = unique_capability("late-taken")
    register_agent(user, capability)
    run_id = submit_direct(user, chain(capability, "a", "b"))
    other: list[stages.ClaimedStage | None] = []

    def agent_answers_after_another_claim(*args: Any, **kwargs: Any) -> AgentOutput:
        _lease_ran_out_and_swept(run_id, "a")
        other.append(stages.claim_stage(run_id, "a"))  # the re-sent message's worker
        return AgentOutput({"late": True}, '{"late": true}')

    monkeypatch.setattr(handlers, "call_agent", agent_answers_after_another_claim)
    assert handlers.run_stage(run_id, "a") == "lost"
    assert other[0] is not None
    row = stage_row(run_id, "a")
    assert (row.status, row.output, row.claim_token) == ("in_progress", None, other[0].claim_token)
    assert stage_row(run_id, "b").status == "pending"
    assert audit_actions(run_id) == [("submit", None), ("requeue", "a")]
