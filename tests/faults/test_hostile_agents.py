"""Hostile agents cannot keep a run from ending: whatever an agent answers (bytes no JSON
encoder writes, 5 MB, a body or its headers trickled, headers past HTTP's limits, nothing
at all, a redirect) or whatever its stored token makes the HTTP client refuse, the stage
ends with an error that names the cause, the agent is called a bounded number of times,
and never again once the run has ended."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from sqlalchemy import func, select, text

from chalicelib.agents.candidates import invalidate_capability
from chalicelib.agents.secrets import encrypt_token
from chalicelib.db import session_scope
from tests.faults.conftest import (
    assert_ended_for_good,
    audit,
    call_log,
    pipeline,
    submit,
    wait_terminal,
)
from tests.integration.conftest import register_agent, unique_capability
from tests.support.agents import (
    hang,
    large,
    raw,
    redirect,
    start_agent,
    status,
    success_with,
    trickle,
    trickle_head,
)

# One retry, no backoff: a retryable failure costs two calls, a final one a single call.
FAST = {"retries": 1, "backoffMs": 0, "timeoutMs": 5000}
CALLS_ALLOWED = FAST["retries"] + 1
# Generous for a shared two-core machine: each of these runs ends within a second or two.
DEADLINE = 20.0

# Outputs Python's json module reads but that are not JSON (RFC 8259) or that Postgres
# cannot store as jsonb: the stage must fail with INVALID_OUTPUT, never loop.
NOT_STORABLE = {
    "nan": b'{"score": NaN}',
    "infinity": b'{"score": Infinity, "low": -Infinity}',
    "nul-escape": b'{"text": "before\\u0000after"}',
    "lone-surrogate": b'{"text": "\\ud800"}',
    "deep-nesting": b"[" * 10_000 + b"]" * 10_000,
}


def failed_stage(run: dict) -> dict:
    [stage] = [s for s in run["stages"] if s["status"] == "failed"]
    return stage


@pytest.mark.parametrize("output", NOT_STORABLE.values(), ids=NOT_STORABLE.keys())
def test_an_output_that_is_not_json_fails_the_stage_as_invalid_output(
    user, engine_poller, agents, output
):
    agent = start_agent(agents, default=success_with(output))
    capability = unique_capability("hostile")
    registered = register_agent(user, capability, endpoint=agent.url)
    run_id = submit(user, pipeline(capability, "a", "b", config=FAST))
    run = wait_terminal(user, run_id, DEADLINE, agent)
    assert run["status"] == "failed", run
    stage = failed_stage(run)
    assert stage["stageId"] == "a"
    assert "INVALID_OUTPUT" in stage["errorMessage"], stage["errorMessage"]
    assert registered["agentId"] in run["errorMessage"]
    assert 1 <= len(agent.calls) <= CALLS_ALLOWED, call_log(agent)
    assert [s["status"] for s in run["stages"]] == ["failed", "skipped"]
    assert_ended_for_good(user, run_id, agent)


def test_an_agent_answering_invalid_output_is_left_for_another_agent(user, engine_poller, agents):
    hostile = start_agent(agents, default=success_with(b'{"score": NaN}'))
    backup = start_agent(agents, health="degraded", default=success_with(b'{"from": "backup"}'))
    capability = unique_capability("nan-fallback")
    first = register_agent(user, capability, endpoint=hostile.url)
    second = register_agent(user, capability, endpoint=backup.url)
    # Online agents are preferred: the hostile one is tried first.
    assert (first["status"], second["status"]) == ("online", "degraded")
    run_id = submit(user, pipeline(capability, "a", config=FAST))
    run = wait_terminal(user, run_id, DEADLINE, hostile)
    assert run["status"] == "completed", run
    assert run["stages"][0]["agentId"] == second["agentId"]
    assert run["stages"][0]["output"] == {"from": "backup"}
    assert 1 <= len(hostile.calls) <= CALLS_ALLOWED, call_log(hostile)
    assert len(backup.calls) == 1
    actions = [(e["action"], e["agentId"]) for e in audit(user, run_id)]
    assert ("fallback", first["agentId"]) in actions
    assert ("execute", second["agentId"]) in actions
    assert_ended_for_good(user, run_id, hostile, backup)


def test_malformed_json_is_retried_then_fails_as_invalid_response(user, engine_poller, agents):
    agent = start_agent(agents, default=raw(b'{"status": "success", "output": {"cut": '))
    capability = unique_capability("malformed")
    register_agent(user, capability, endpoint=agent.url)
    run_id = submit(user, pipeline(capability, "a", config=FAST))
    run = wait_terminal(user, run_id, DEADLINE, agent)
    assert run["status"] == "failed", run
    assert "INVALID_RESPONSE" in failed_stage(run)["errorMessage"], run
    assert len(agent.calls) == CALLS_ALLOWED, call_log(agent)  # retryable: every attempt used
    assert_ended_for_good(user, run_id, agent)


def test_a_nul_in_an_agents_error_message_does_not_keep_the_stage_from_failing(
    user, engine_poller, agents
):
    answer = b'{"status": "error", "code": "BAD_INPUT", "message": "bad\\u0000input", "retryable": false}'
    agent = start_agent(agents, default=raw(answer))
    capability = unique_capability("nul-error")
    register_agent(user, capability, endpoint=agent.url)
    run_id = submit(user, pipeline(capability, "a", config=FAST))
    run = wait_terminal(user, run_id, DEADLINE, agent)
    assert run["status"] == "failed", run
    message = failed_stage(run)["errorMessage"]
    assert "BAD_INPUT" in message and "\x00" not in message, message
    assert "\x00" not in run["errorMessage"]
    assert len(agent.calls) == 1, call_log(agent)  # final: not retried
    assert_ended_for_good(user, run_id, agent)


def test_a_5_mb_answer_fails_the_stage_as_response_too_large(user, engine_poller, agents):
    agent = start_agent(agents, default=large(5_000_000))
    capability = unique_capability("huge")
    register_agent(user, capability, endpoint=agent.url)
    run_id = submit(user, pipeline(capability, "a", config=FAST))
    run = wait_terminal(user, run_id, DEADLINE, agent)
    assert run["status"] == "failed", run
    assert "RESPONSE_TOO_LARGE" in failed_stage(run)["errorMessage"], run
    assert len(agent.calls) == 1, call_log(agent)  # final: not retried
    assert_ended_for_good(user, run_id, agent)


# The stage's timeoutMs bounds the whole call, not each read: 2 s, with up to 2 s more for
# a loaded machine to notice and hang up. Measured on the agent's side.
TIMEOUT_MS = 2000
CALL_SECONDS_ALLOWED = 4.0


TRICKLED = b'{"status": "success", "output": {"trickled": "one byte a second"}}'


@pytest.mark.parametrize(
    "behaviour",
    [
        pytest.param(
            lambda: trickle(TRICKLED, interval=1.0), id="an answer trickled a byte a second"
        ),
        pytest.param(
            lambda: trickle_head(TRICKLED, interval=0.5),
            id="a status line and headers trickled a byte every half second",
        ),
        pytest.param(hang, id="an agent that never answers"),
    ],
)
def test_a_slow_answer_times_out_at_the_stage_timeout(user, engine_poller, agents, behaviour):
    agent = start_agent(agents, default=behaviour())
    capability = unique_capability("slow")
    register_agent(user, capability, endpoint=agent.url)
    run_id = submit(user, pipeline(capability, "a", config={"timeoutMs": TIMEOUT_MS, "retries": 0}))
    run = wait_terminal(user, run_id, 15.0, agent)
    assert run["status"] == "failed", run
    assert "TIMEOUT" in failed_stage(run)["errorMessage"], run
    [call] = agent.calls
    assert call.outcome == "client-closed", call_log(agent)
    assert call.seconds is not None and call.seconds < CALL_SECONDS_ALLOWED, call_log(agent)
    assert_ended_for_good(user, run_id, agent)


def test_a_redirect_is_refused_not_followed(user, engine_poller, agents):
    target = start_agent(agents)
    agent = start_agent(agents, default=redirect(target.url, 307))
    capability = unique_capability("redirect")
    register_agent(user, capability, endpoint=agent.url)
    run_id = submit(user, pipeline(capability, "a", config=FAST))
    run = wait_terminal(user, run_id, DEADLINE, agent)
    assert run["status"] == "failed", run
    assert "REDIRECT_REFUSED" in failed_stage(run)["errorMessage"], run
    assert len(agent.calls) == 1 and target.calls == []
    assert_ended_for_good(user, run_id, agent, target)


def test_a_token_the_http_client_refuses_as_a_header_fails_the_stage(user, engine_poller, agents):
    agent = start_agent(agents)
    capability = unique_capability("header")
    registered = register_agent(user, capability, endpoint=agent.url)
    # Registration validates tokens; this one got into the database some other way (an
    # older version, a manual fix). http.client refuses to send a header with CR/LF.
    with session_scope() as session:
        session.execute(
            text("UPDATE agents SET auth_token_encrypted = :token WHERE id = :id"),
            {"token": encrypt_token("tok\r\nX-Evil: 1"), "id": uuid.UUID(registered["agentUuid"])},
        )
    invalidate_capability(capability)
    run_id = submit(user, pipeline(capability, "a", config=FAST))
    run = wait_terminal(user, run_id, DEADLINE, agent)
    assert run["status"] == "failed", run
    assert "header" in failed_stage(run)["errorMessage"].lower(), run
    assert agent.calls == [], call_log(agent)  # the request never left
    assert not any("X-Evil" in seen.headers for seen in agent.seen)
    assert_ended_for_good(user, run_id, agent)


@pytest.mark.parametrize("head", [True, False], ids=["headers trickled", "body trickled"])
def test_a_health_probe_of_an_agent_pacing_its_answer_ends_at_its_timeout(head):
    """The probe holds the scheduled health check (and the probes after it) no longer
    than MAOF_AGENT_HEALTH_TIMEOUT_MS, however the agent paces its bytes: it is offline."""
    from chalicelib.agents.health import probe
    from chalicelib.config import get_settings
    from tests.support.callbacks import TricklingServer

    agent = TricklingServer("head" if head else "body")
    started = time.monotonic()
    try:
        assert probe(f"{agent.url}/agent") == "offline"
    finally:
        agent.stop.set()
    allowed = get_settings().agent_health_timeout_ms / 1000 + 1.5
    assert time.monotonic() - started < allowed


def test_the_scheduled_health_check_ends_in_its_budget_and_resumes_with_the_stalest(
    user, monkeypatch
):
    """Agents that answer their /health at a crawl (a user registering hundreds of them,
    or many agents down): the check records what it probed chunk by chunk, stops within
    its budget (the function has 60 s; the results used to wait for every agent), and the
    next check starts with the agents left unchecked."""
    from sqlalchemy import update

    from chalicelib.agents import health
    from chalicelib.config import reset_settings
    from chalicelib.db import session_scope
    from chalicelib.db.models import Agent
    from tests.support.callbacks import TricklingServer

    monkeypatch.setenv("MAOF_AGENT_HEALTH_TIMEOUT_MS", "500")
    reset_settings()
    monkeypatch.setattr(health, "CHECK_CHUNK", 2)
    servers = [TricklingServer("head") for _ in range(4)]
    try:
        capability = unique_capability("crawl")
        ids = [
            uuid.UUID(register_agent(user, capability, endpoint=f"{s.url}/agent")["agentUuid"])
            for s in servers
        ]
        with session_scope() as session:  # never checked: the first in line
            session.execute(update(Agent).where(Agent.id.in_(ids)).values(last_health_check=None))
            # and behind them the agents other tests left (some never checked either)
            others = update(Agent).where(Agent.id.not_in(ids))
            session.execute(others.values(last_health_check=func.now()))
        started = time.monotonic()
        first = health.scheduled_check(budget_seconds=0.8)
        assert time.monotonic() - started < 1.6
        assert first["checked"] == 2 and first["statuses"] == {"offline": 2}
        second = health.scheduled_check(budget_seconds=0.8)
        assert second["checked"] == 2
        with session_scope() as session:
            checked = session.execute(
                select(Agent.status, Agent.last_health_check).where(Agent.id.in_(ids))
            ).all()
        assert all(status == "offline" and at is not None for status, at in checked)
    finally:
        for server in servers:
            server.stop.set()
        monkeypatch.delenv("MAOF_AGENT_HEALTH_TIMEOUT_MS")
        reset_settings()


@pytest.mark.parametrize(
    "pace",
    [
        pytest.param("tls", id="a TLS handshake record a byte at a time"),
        pytest.param("chunked", id="a chunk's size line a byte at a time"),
    ],
)
def test_an_agent_pacing_the_framing_of_its_answer_is_cut_off_at_the_deadline(pace):
    """Each read returns in time, so only a bound on the whole call ends these: the ssl
    module bounds a handshake by the socket's timeout (what is left of the call's
    deadline), and the watchdog the body, chunk framing included (http.client reads a
    chunk's size line, up to 64 KB, in one read of ours)."""
    from chalicelib.agents.dispatch import AgentCallFailed, AgentTask, call_agent
    from tests.support.callbacks import TricklingServer

    agent = TricklingServer(pace)
    scheme = "https://" if pace == "tls" else "http://"
    task = AgentTask("wfr-pace", "s0", 1, "summarization", {"text": "hi"}, "pace", timeout_ms=1000)
    started = time.monotonic()
    try:
        with pytest.raises(AgentCallFailed) as failed:
            call_agent(agent.url.replace("http://", scheme) + "/agent", "t", "pace", task)
    finally:
        agent.stop.set()
    assert time.monotonic() - started < 2.5
    assert failed.value.code == "TIMEOUT", failed.value


HEAD_BOMBS = {
    "150 headers": {f"X-Pad-{i}": "x" for i in range(150)},
    "a 100 KiB header": {"X-Pad": "x" * 100_000},
}


@pytest.mark.parametrize("headers", HEAD_BOMBS.values(), ids=HEAD_BOMBS.keys())
def test_an_answer_past_the_http_clients_limits_fails_the_stage_as_invalid_response(
    user, engine_poller, agents, headers
):
    answer = json.dumps({"status": "success", "output": {"ok": True}})
    agent = start_agent(agents, default=status(200, answer, headers))
    capability = unique_capability("head-bomb")
    register_agent(user, capability, endpoint=agent.url)
    run_id = submit(user, pipeline(capability, "a", config=FAST))
    run = wait_terminal(user, run_id, DEADLINE, agent)
    assert run["status"] == "failed", run
    # The agent answered: not "could not reach the agent", but what was wrong with it.
    assert "INVALID_RESPONSE: the agent's answer is not valid HTTP" in run["errorMessage"], run
    assert len(agent.calls) == CALLS_ALLOWED, call_log(agent)  # retryable, as bad JSON is
    assert_ended_for_good(user, run_id, agent)


def test_an_agent_answering_its_health_probe_too_deeply_nested_harms_no_other_agent(user, agents):
    """A /health answer nested deeper than Python's parser goes (4 KB of `[`, within the
    probe's read) is an unreadable answer like any other: that agent is degraded. It
    used to raise out of the probe: its registration answered 500, and the scheduled check,
    which starts with the stalest agents, failed at its first chunk every time, so no
    agent of any user had its health checked again."""
    from sqlalchemy import update

    from chalicelib.agents import health
    from chalicelib.db.models import Agent

    hostile = start_agent(agents, health=b"[" * 4000)
    honest = start_agent(agents)
    capability = unique_capability("deep-health")
    registered = register_agent(user, capability, endpoint=hostile.url)
    assert registered["status"] == "degraded", registered
    other = register_agent(user, capability, endpoint=honest.url)
    ids = [uuid.UUID(registered["agentUuid"]), uuid.UUID(other["agentUuid"])]
    with session_scope() as session:  # never checked: the first in line
        session.execute(
            update(Agent).where(Agent.id.in_(ids)).values(last_health_check=None, status="offline")
        )
    health.scheduled_check()
    with session_scope() as session:
        statuses = dict(
            session.execute(select(Agent.id, Agent.status).where(Agent.id.in_(ids))).all()
        )
    assert statuses == {ids[0]: "degraded", ids[1]: "online"}, statuses


def test_a_probe_that_raises_marks_that_agent_offline_and_the_others_are_recorded(
    user, agents, monkeypatch
):
    """Whatever else an answer makes the probe raise, the check isolates it: that agent
    is offline, and every other agent probed with it has its status recorded."""
    from chalicelib.agents import health
    from chalicelib.db.models import Agent

    broken, fine = start_agent(agents), start_agent(agents)
    capability = unique_capability("probe-raises")
    ids = [
        uuid.UUID(register_agent(user, capability, endpoint=a.url)["agentUuid"])
        for a in (broken, fine)
    ]
    probe = health.probe

    def raising_for_one(endpoint: str) -> str:
        if endpoint == broken.url:
            raise KeyError("a case the probe did not foresee")
        return probe(endpoint)

    monkeypatch.setattr(health, "probe", raising_for_one)
    checked = health.check([(ids[0], broken.url), (ids[1], fine.url)])
    assert {agent.id: agent.status for agent in checked} == {ids[0]: "offline", ids[1]: "online"}
    with session_scope() as session:
        statuses = dict(
            session.execute(select(Agent.id, Agent.status).where(Agent.id.in_(ids))).all()
        )
    assert statuses == {ids[0]: "offline", ids[1]: "online"}
