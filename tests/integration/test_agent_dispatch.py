"""Real agents over HTTP: the protocol, retries, fallback, non-retryable errors, garbage,
health checks steering routing, capacity, and idempotency keys — each with its audit trail."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from chalicelib import db
from chalicelib.agents import secrets
from chalicelib.agents.candidates import invalidate_capability
from chalicelib.core import api as run_ids
from chalicelib.db.models import Agent
from chalicelib.engine import handlers, stages
from chalicelib.workflows import runs
from tests.integration.conftest import (
    Api,
    register_agent,
    unique_capability,
    wait_for_run,
    wait_until,
)
from tests.support.agents import error, garbage, ok, sleep, status
from tests.support.agents import start_agent as start


def submit(
    client: Api, capability: str, config: dict[str, Any] | None = None, count: int = 1
) -> str:
    stages_ = [
        {
            "id": f"s{i}",
            "name": f"Stage {i}",
            "agentCapability": capability,
            **({"config": config} if config else {}),
        }
        for i in range(count)
    ]
    response = client.post(
        "/workflows/execute",
        {"workflow": {"name": "dispatch", "stages": stages_}, "input": {"text": "hi"}},
    )
    assert response.status_code == 202, response.text
    return str(response.json()["data"]["workflowRunId"])


def audit(client: Api, run_id: str) -> list[dict[str, Any]]:
    body = client.get(f"/workflows/{run_id}/audit").json()["data"]
    assert body["chain"]["valid"] is True
    return list(body["logs"])


def actions(entries: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    return [(e["action"], e["agentId"]) for e in entries if e["action"] != "submit"]


FAST = {"retries": 2, "backoffMs": 0, "timeoutMs": 2000}


def test_success_sends_the_protocol_request_and_stores_the_output(user, poller, agents):
    agent = start(agents, default=ok({"answer": 42}))
    capability = unique_capability("http")
    registered = register_agent(user, capability, endpoint=agent.url, authToken="tok-123")
    assert registered["status"] == "online"
    run_id = submit(user, capability)
    run = wait_for_run(user, run_id)
    assert run["status"] == "completed", run
    assert run["stages"][0]["output"] == {"answer": 42}
    [call] = agent.calls
    assert call.headers["Authorization"] == "Bearer tok-123"
    assert call.headers["Idempotency-Key"] == f"{run_id}:s0:1"
    assert call.body["workflowRunId"] == run_id
    assert call.body["stageId"] == "s0"
    assert call.body["capability"] == capability
    assert call.body["input"] == {"text": "hi"}
    assert call.body["context"]["workflowName"] == "dispatch"
    # The stage's timeoutMs (30 s), less the moments spent choosing the agent.
    assert 29_000 < call.body["context"]["deadlineMs"] <= 30_000
    assert actions(audit(user, run_id)) == [("execute", registered["agentId"]), ("complete", None)]
    assert "tok-123" not in str(audit(user, run_id))


def test_every_dependency_is_sent_as_completed_whether_or_not_the_input_reads_it(
    user, poller, agents
):
    """A stage runs once all its dependencies completed: previousStages says so of each,
    also of one whose output its `input` does not reference (that output is not loaded)."""
    first, second = unique_capability("prev"), unique_capability("prev")
    register_agent(user, first)
    agent = start(agents, default=ok({"done": True}))
    register_agent(user, second, endpoint=agent.url)
    stages_ = [
        {"id": "extract", "name": "E", "agentCapability": first},
        {"id": "count", "name": "C", "agentCapability": first},
        {
            "id": "translate",
            "name": "T",
            "agentCapability": second,
            "dependencies": ["extract", "count"],
            "input": {"to": "${workflow.input.language}", "n": "${count.output}"},
        },
    ]
    body = {"workflow": {"name": "prev", "stages": stages_}, "input": {"language": "es"}}
    run_id = user.post("/workflows/execute", body).json()["data"]["workflowRunId"]
    assert wait_for_run(user, run_id)["status"] == "completed"
    [call] = agent.calls
    assert call.body["context"]["previousStages"] == [
        {"stageId": "extract", "completed": True},
        {"stageId": "count", "completed": True},
    ]


def test_timeout_then_success_on_retry(user, poller, agents):
    agent = start(agents)
    agent.script.extend([sleep(1.5), ok({"second": True})])
    capability = unique_capability("slow")
    registered = register_agent(user, capability, endpoint=agent.url)
    run_id = submit(user, capability, {"timeoutMs": 300, "retries": 2, "backoffMs": 0})
    run = wait_for_run(user, run_id)
    assert run["status"] == "completed", run
    assert run["stages"][0]["output"] == {"second": True}
    # After a timeout the first call may still be running at the agent: the same key.
    assert run["stages"][0]["attempt"] == 1
    assert agent.keys() == [f"{run_id}:s0:1", f"{run_id}:s0:1"]
    entries = audit(user, run_id)
    assert actions(entries) == [
        ("retry", registered["agentId"]),
        ("execute", registered["agentId"]),
        ("complete", None),
    ]
    assert entries[1]["details"]["code"] == "TIMEOUT"


@pytest.mark.parametrize(
    ("retry_after", "waited_ms"),
    [("2", 2000), ("999999999", 1500)],  # what it asks for; at most maxBackoffMs
)
def test_an_agent_at_its_own_limit_is_retried_after_its_retry_after(
    user, poller, agents, retry_after, waited_ms
):
    """An agent's 429 (or 503) with Retry-After: the retry waits what it asked for, up to
    the stage's maxBackoffMs; before, its retries came after the usual backoff (here
    none) and used themselves up while it was still refusing."""
    agent = start(agents)
    agent.script.extend([status(429, "", {"Retry-After": retry_after}), ok({"later": True})])
    capability = unique_capability("limited")
    register_agent(user, capability, endpoint=agent.url)
    run_id = submit(
        user,
        capability,
        {"retries": 2, "backoffMs": 0, "maxBackoffMs": 1500 if waited_ms == 1500 else 5000},
    )
    run = wait_for_run(user, run_id)
    assert run["status"] == "completed", run
    first, second = agent.calls
    assert second.started - first.started >= waited_ms / 1000
    retry = [e for e in audit(user, run_id) if e["action"] == "retry"]
    assert [(e["details"]["code"], e["details"]["delayMs"]) for e in retry] == [
        ("HTTP_429", waited_ms)
    ]


def test_retryable_errors_exhausted_on_one_agent_then_success_on_the_fallback(user, poller, agents):
    flaky = start(agents, default=status(503, '{"message": "overloaded"}'))
    backup = start(agents, health="degraded", default=ok({"from": "backup"}))
    capability = unique_capability("fallback")
    first = register_agent(user, capability, endpoint=flaky.url)
    second = register_agent(user, capability, endpoint=backup.url)
    assert (first["status"], second["status"]) == ("online", "degraded")
    run_id = submit(user, capability, {"retries": 1, "backoffMs": 0})
    run = wait_for_run(user, run_id)
    assert run["status"] == "completed", run
    assert run["stages"][0]["agentId"] == second["agentId"]
    assert len(flaky.calls) == 2 and len(backup.calls) == 1
    assert actions(audit(user, run_id)) == [
        ("retry", first["agentId"]),
        ("fallback", first["agentId"]),
        ("execute", second["agentId"]),
        ("complete", None),
    ]
    assert backup.keys() == [f"{run_id}:s0:3"]


def test_non_retryable_error_fails_the_stage_at_once(user, poller, agents):
    agent = start(agents, default=error("BAD_INPUT", retryable=False))
    capability = unique_capability("final")
    registered = register_agent(user, capability, endpoint=agent.url)
    run_id = submit(user, capability, FAST)
    run = wait_for_run(user, run_id)
    assert run["status"] == "failed"
    assert "BAD_INPUT" in run["errorMessage"] and registered["agentId"] in run["errorMessage"]
    assert len(agent.calls) == 1
    assert actions(audit(user, run_id)) == [("fail", registered["agentId"])]


def test_agent_returning_garbage_is_retried_then_fails_the_stage(user, poller, agents):
    agent = start(agents, default=garbage())
    capability = unique_capability("garbage")
    registered = register_agent(user, capability, endpoint=agent.url)
    run_id = submit(user, capability, {"retries": 1, "backoffMs": 0})
    run = wait_for_run(user, run_id)
    assert run["status"] == "failed"
    assert "not a MAOF protocol response" in run["errorMessage"]
    assert len(agent.calls) == 2
    assert actions(audit(user, run_id)) == [
        ("retry", registered["agentId"]),
        ("fail", registered["agentId"]),
    ]


def test_agent_down_mid_run_is_marked_offline_by_the_health_check_and_avoided(user, poller, agents):
    doomed = start(agents)
    backup = start(agents, health="degraded", default=ok({"from": "backup"}))
    capability = unique_capability("down")
    first = register_agent(user, capability, endpoint=doomed.url)
    second = register_agent(user, capability, endpoint=backup.url)
    doomed.stop()  # goes down while it is still registered as online
    run_id = submit(user, capability, {"retries": 1, "backoffMs": 0})
    run = wait_for_run(user, run_id)
    assert run["status"] == "completed", run
    assert [a for a, _ in actions(audit(user, run_id))] == [
        "retry",
        "fallback",
        "execute",
        "complete",
    ]

    result = handlers.check_agent_health()
    assert result["checked"] >= 2
    assert user.get(f"/agents/{first['agentUuid']}").json()["data"]["status"] == "offline"
    assert user.get(f"/agents/{first['agentUuid']}").json()["data"]["lastHealthCheck"] is not None
    listed = user.get("/agents", params={"capability": capability, "status": "offline"}).json()[
        "data"
    ]
    assert [a["agentUuid"] for a in listed["agents"]] == [first["agentUuid"]]

    run_id = submit(user, capability, {"retries": 1, "backoffMs": 0}, count=3)
    run = wait_for_run(user, run_id)
    assert run["status"] == "completed", run
    assert {s["agentId"] for s in run["stages"]} == {second["agentId"]}
    assert [a for a, _ in actions(audit(user, run_id))] == [
        "execute",
        "execute",
        "execute",
        "complete",
    ]


def test_on_demand_health_check_reports_the_agents_state(user, agents):
    agent = start(agents)
    registered = register_agent(user, unique_capability("probe"), endpoint=agent.url)
    assert registered["status"] == "online"
    agent.health = "degraded"
    response = user.post(f"/agents/{registered['agentUuid']}/health-check")
    assert response.status_code == 200
    assert response.json()["data"]["status"] == "degraded"
    agent.stop()
    assert (
        user.post(f"/agents/{registered['agentUuid']}/health-check").json()["data"]["status"]
        == "offline"
    )


def test_a_full_agent_makes_the_stage_wait_not_fail(user, poller, agents, monkeypatch):
    agent = start(agents, default=sleep(0.8))
    capability = unique_capability("full")
    registered = register_agent(user, capability, endpoint=agent.url, maxConcurrentTasks=1)
    # Deliver the three stage messages at the same moment (as three concurrent Lambda
    # executions would); what they send afterwards goes through SQS and the poller.
    first_messages: list[Any] = []
    monkeypatch.setattr(
        runs, "send_stage_messages", lambda run_id, ids, **_: first_messages.append((run_id, ids))
    )
    run_ref = submit(user, capability, FAST, count=3)
    [(run_id, stage_ids)] = first_messages
    barrier = threading.Barrier(len(stage_ids))

    def deliver(stage_id: str) -> None:
        barrier.wait()
        body = json.dumps({"runId": str(run_id), "stageId": stage_id})
        handlers.run_stage_batch([{"messageId": stage_id, "receiptHandle": "r", "body": body}])

    threads = [threading.Thread(target=deliver, args=(s,)) for s in stage_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    run = wait_for_run(user, run_ref)
    assert run["status"] == "completed", run
    assert agent.peak_concurrent == 1
    assert len(agent.calls) == 3
    entries = actions(audit(user, run_ref))
    assert entries.count(("execute", registered["agentId"])) == 3
    assert entries.count(("wait", None)) == 2  # the two stages that found it full, once each
    assert all(stage["attempt"] == 1 for stage in run["stages"])  # waiting used no attempt


@pytest.mark.parametrize(
    ("error", "counted"),
    [
        # The database went away after the agent answered: handed back, not counted.
        (OperationalError("UPDATE …", {}, Exception("server closed the connection")), False),
        # Anything else: counted against the stage, and retried after its backoff.
        (ConnectionError("something of ours broke after the agent answered"), True),
    ],
)
def test_idempotency_key_is_the_same_when_an_attempt_runs_again_after_an_error(
    user, agents, monkeypatch, error, counted
):
    agent = start(agents, default=ok({"done": 1}))
    capability = unique_capability("idem")
    register_agent(user, capability, endpoint=agent.url)
    sent: list[Any] = []
    monkeypatch.setattr(runs, "send_stage_messages", lambda *a, **k: sent.append(a))
    monkeypatch.setattr(handlers, "send_stage_messages", lambda *a, **k: sent.append(a))
    run_id = run_ids.parse_run_ref(submit(user, capability, FAST))
    message = {
        "messageId": "m1",
        "receiptHandle": "r",
        "body": f'{{"runId": "{run_id}", "stageId": "s0"}}',
    }

    real_complete = stages.complete_stage

    def crash(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(stages, "complete_stage", crash)
    failures = handlers.run_stage_batch([message])["batchItemFailures"]
    assert failures == ([] if counted else [{"itemIdentifier": "m1"}])
    monkeypatch.setattr(stages, "complete_stage", real_complete)
    # Handed back or retried, it is due again when its message comes back.
    wait_until(lambda: stages.seconds_until_due(run_id, "s0") is None, timeout=5)
    assert handlers.run_stage_batch([message]) == {"batchItemFailures": []}  # runs again
    assert agent.keys() == [f"wfr-{run_id}:s0:1"] * 2
    run = user.get(f"/workflows/wfr-{run_id}").json()["data"]
    assert run["status"] == "completed"
    entries = audit(user, f"wfr-{run_id}")
    assert actions(entries).count(("execute", run["stages"][0]["agentId"])) == 1
    retries = [e for e in entries if e["action"] == "retry"]
    assert [e["details"]["code"] for e in retries] == (["INTERNAL_ERROR"] if counted else [])


def store_token(agent: dict[str, Any], capability: str, ciphertext: str) -> None:
    """Replace the agent's stored token, as routing sees it from now on."""
    with db.session_scope() as session:
        session.execute(
            update(Agent)
            .where(Agent.id == uuid.UUID(agent["agentUuid"]))
            .values(auth_token_encrypted=ciphertext)
        )
    invalidate_capability(capability)


@pytest.fixture
def lose_the_key_of() -> Iterator[Callable[[dict[str, Any], str], None]]:
    """Store an agent's token under a key no longer configured (dropped before the token
    was re-encrypted: docs/security.md); readable again once the test ends, since later
    tests re-encrypt every token and count the ones no key reads."""
    lost: list[tuple[dict[str, Any], str]] = []

    def lose(agent: dict[str, Any], capability: str) -> None:
        store_token(agent, capability, secrets._fernet_of("l" * 40).encrypt(b"t").decode())
        lost.append((agent, capability))

    yield lose
    for agent, capability in lost:
        store_token(agent, capability, secrets.encrypt_token("t"))


UNREADABLE = "can no longer be decrypted with any key; register it again"


def test_an_agent_whose_token_no_key_reads_falls_back_to_a_healthy_agent(
    user, poller, agents, lose_the_key_of
):
    """Its InvalidToken was an internal error: retried on the same agent, then the stage
    failed, though another agent could serve it. It is an agent that cannot serve."""
    unreadable = start(agents)
    healthy = start(agents, health="degraded", default=ok({"from": "healthy"}))
    capability = unique_capability("lostkey")
    first = register_agent(user, capability, endpoint=unreadable.url)
    second = register_agent(user, capability, endpoint=healthy.url)
    assert (first["status"], second["status"]) == ("online", "degraded")  # first is tried first
    lose_the_key_of(first, capability)
    for _ in range(3):
        run_id = submit(user, capability, FAST)
        run = wait_for_run(user, run_id)
        assert run["status"] == "completed", run
        assert run["stages"][0]["agentId"] == second["agentId"]
        assert actions(audit(user, run_id)) == [
            ("fallback", first["agentId"]),
            ("execute", second["agentId"]),
            ("complete", None),
        ]
    assert unreadable.calls == []  # never called without its token
    assert len(healthy.calls) == 3


def test_a_stage_whose_only_agent_has_a_token_no_key_reads_fails_saying_so(
    user, poller, agents, lose_the_key_of
):
    unreadable = start(agents)
    capability = unique_capability("lostkey")
    registered = register_agent(user, capability, endpoint=unreadable.url)
    lose_the_key_of(registered, capability)
    run = wait_for_run(user, submit(user, capability, FAST))
    assert run["status"] == "failed"
    assert UNREADABLE in run["errorMessage"] and registered["agentId"] in run["errorMessage"]
    assert "InvalidToken" not in run["errorMessage"]
    assert unreadable.calls == []


def test_unreachable_agent_registers_as_offline_and_is_not_routed_to(user, poller):
    capability = unique_capability("ghost")
    registered = register_agent(user, capability, endpoint=f"http://127.0.0.1:9/{uuid.uuid4().hex}")
    assert registered["status"] == "offline"
    run = wait_for_run(user, submit(user, capability))
    assert run["status"] == "failed"
    assert capability in run["errorMessage"]
