"""Backpressure: an agent's slots are leases (a dead worker's slot comes back by its
deadline), a stage that finds every slot taken waits in Postgres and is handed the next
slot at once, the sweeper wakes a wait whose hand-off was lost, the hand-offs are fair
across users and runs, and an agent never gets more calls at once than its
maxConcurrentTasks."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import text

from chalicelib import cache
from chalicelib.agents import selection
from chalicelib.config import get_settings, reset_settings
from chalicelib.db import session_scope
from chalicelib.engine import sweeper
from tests.integration.conftest import (
    Api,
    register_agent,
    unique_capability,
    wait_for_run,
    wait_until,
)
from tests.integration.test_delivery import audit_actions, chain, stage_row, submit_direct
from tests.integration.test_redis_down import redis_unreachable


@dataclass
class TimedCall:
    run_id: str
    stage_id: str
    started: float  # time.monotonic()
    ended: float | None = None
    began_at: float = field(default_factory=time.time)  # wall clock, to compare with Postgres


@dataclass
class TimedAgent:
    """An agent that answers after `seconds` and records when each call began and ended,
    and the most calls it ever had at once."""

    seconds: float
    calls: list[TimedCall] = field(default_factory=list)
    concurrent: int = 0
    peak: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/agent"

    def start(self) -> TimedAgent:
        agent = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._send(b'{"status": "healthy"}')

            def do_POST(self) -> None:
                task = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                call = TimedCall(task["workflowRunId"], task["stageId"], time.monotonic())
                with agent.lock:
                    agent.calls.append(call)
                    agent.concurrent += 1
                    agent.peak = max(agent.peak, agent.concurrent)
                time.sleep(agent.seconds)
                with agent.lock:
                    agent.concurrent -= 1
                    call.ended = time.monotonic()
                self._send(json.dumps({"status": "success", "output": {"ok": True}}).encode())

            def _send(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def timed() -> Iterator[list[TimedAgent]]:
    started: list[TimedAgent] = []
    yield started
    for agent in started:
        agent.stop()


def timed_agent(started: list[TimedAgent], seconds: float) -> TimedAgent:
    agent = TimedAgent(seconds).start()
    started.append(agent)
    return agent


def submit(
    client: Api,
    capability: str,
    stages: int = 1,
    name: str = "bp",
    config: dict[str, Any] | None = None,
) -> str:
    body = {
        "workflow": {
            "name": name,
            "stages": [
                {
                    "id": f"s{i}",
                    "name": f"S{i}",
                    "agentCapability": capability,
                    **({"config": config} if config else {}),
                }
                for i in range(stages)
            ],
        }
    }
    response = client.post("/workflows/execute", body)
    assert response.status_code == 202, response.text
    return str(response.json()["data"]["workflowRunId"])


# ------------------------------------------------------------------ slots are leases


def test_a_dead_workers_slot_comes_back_by_its_deadline(
    user: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    capability = unique_capability("lease")
    agent = register_agent(user, capability, maxConcurrentTasks=1)
    monkeypatch.setattr(selection, "SLOT_MARGIN_SECONDS", 0.0)
    held = selection._reserve(agent["agentUuid"], 1, time.time() + 1.0)
    assert isinstance(held, str)  # the worker holding it dies: nobody gives it back
    assert selection._reserve(agent["agentUuid"], 1, time.time() + 60) is False
    assert selection.live_slots(agent["agentUuid"]) == 1
    started = time.monotonic()
    wait_until(lambda: selection.live_slots(agent["agentUuid"]) == 0, timeout=5)
    assert time.monotonic() - started < 3
    assert isinstance(selection._reserve(agent["agentUuid"], 1, time.time() + 60), str)


@pytest.fixture
def short_leases(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """Stage (and so slot) leases of 3 s, the least MAOF_STAGE_LEASE_SECONDS allows."""
    monkeypatch.setenv("MAOF_STAGE_LEASE_SECONDS", "3")
    reset_settings()
    yield 3
    monkeypatch.delenv("MAOF_STAGE_LEASE_SECONDS")
    reset_settings()


def test_a_dead_workers_slot_comes_back_within_a_lease_not_its_calls_deadline(
    user: Api, short_leases: int
) -> None:
    """A stage with a 10-minute timeout: its worker dies mid-call. The slot comes back once
    the worker stops renewing it (one stage lease), not ten minutes later; a living
    worker's renewals keep its slot past that lease."""
    capability = unique_capability("lease-renewed")
    agent = register_agent(user, capability, maxConcurrentTasks=1)
    uuid_ = agent["agentUuid"]
    alive = selection._reserve(uuid_, 1, time.time() + 600)
    assert isinstance(alive, str)
    deadline = time.monotonic() + short_leases * 2
    while time.monotonic() < deadline:  # the renewer's round, by hand, every second
        selection.renew_slots()
        assert selection.live_slots(uuid_) == 1
        time.sleep(1)
    selection.release(selection.AgentChoice(uuid_, "a", "mock://x", "t", 1, slot=alive))
    selection.renew_slots()  # a slot given back is not taken again by a late renewal
    assert selection.live_slots(uuid_) == 0

    dead = selection._reserve(uuid_, 1, time.time() + 600)
    assert isinstance(dead, str)
    selection._held_slots.clear()  # the worker died: nobody renews it, nobody gives it back
    assert selection._reserve(uuid_, 1, time.time() + 600) is False
    started = time.monotonic()
    wait_until(lambda: selection.live_slots(uuid_) == 0, timeout=short_leases + 5)
    assert time.monotonic() - started <= short_leases + 1
    assert isinstance(selection._reserve(uuid_, 1, time.time() + 600), str)


def test_a_slot_is_renewed_no_further_than_its_calls_deadline(user: Api, short_leases: int) -> None:
    capability = unique_capability("lease-capped")
    agent = register_agent(user, capability, maxConcurrentTasks=1)
    until = time.time() + 0.5  # the call's deadline, shorter than a lease
    slot = selection._reserve(agent["agentUuid"], 1, until)
    assert isinstance(slot, str)
    score = cache.get_redis().zscore(f"maof:agents:slots:{agent['agentUuid']}", slot)
    assert score == pytest.approx(until + selection.SLOT_MARGIN_SECONDS)
    selection.renew_slots()
    score = cache.get_redis().zscore(f"maof:agents:slots:{agent['agentUuid']}", slot)
    assert score == pytest.approx(until + selection.SLOT_MARGIN_SECONDS)


def _handed_slot(agent: dict[str, Any], until: float) -> selection.AgentChoice:
    """A slot on the agent (one slot in all), taken and handed over for a call that was to
    end at `until`."""
    slot = selection._reserve(agent["agentUuid"], 1, until)
    assert isinstance(slot, str)
    [listed] = selection.eligible(agent["capabilities"][0], uuid.UUID(agent["ownerUserUuid"]))
    return selection.AgentChoice(
        agent["agentUuid"], agent["agentId"], listed["endpoint"], listed["tokenEncrypted"], 1, slot
    )


def test_a_handed_slots_lease_lasts_to_the_deadline_of_the_call_it_was_handed_to(
    user: Api, sent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slot is handed over under a lease to the deadline its stage would have if it
    started then; the stage starts later (it waited for a thread, a connection) and its
    call's deadline with it. The lease used to end that much before the call: another stage
    took the slot mid-call, and the agent had two calls at once with maxConcurrentTasks 1.
    Now the stage, once it knows its deadline, extends the lease to it plus the margin."""
    from chalicelib.agents.dispatch import AgentOutput, AgentTask
    from chalicelib.core.api import parse_run_ref
    from chalicelib.engine import handlers, stages

    agent = register_agent(user, unique_capability("handed-lease"), maxConcurrentTasks=1)
    run_id = parse_run_ref(
        submit(user, agent["capabilities"][0], config={"timeoutMs": 2000, "retries": 0})
    )
    claimed = stages.claim_stage(run_id, "s0")
    assert claimed is not None
    handed = _handed_slot(agent, time.time() - 4)  # handed over 6 s before the stage began
    seen: list[tuple[float, float | None, float | None]] = []

    def agent_answers(endpoint: str, token: str, agent_id: str, task: AgentTask) -> AgentOutput:
        assert task.deadline is not None
        deadline = time.time() + (task.deadline - time.monotonic())
        key = f"maof:agents:slots:{agent['agentUuid']}"
        lease = cache.get_redis().zscore(key, str(handed.slot))
        seen.append((deadline, lease, selection._held_slots.get((agent["agentUuid"], handed.slot))))
        return AgentOutput({"ok": True}, '{"ok": true}')

    monkeypatch.setattr(handlers, "call_agent", agent_answers)
    assert handlers._run_claimed(claimed, handlers.Invocation(), handed=handed) == "completed"
    [(deadline, lease, cap)] = seen
    expected = pytest.approx(deadline + selection.SLOT_MARGIN_SECONDS, abs=0.5)
    assert (lease, cap) == (expected, expected)
    assert selection.live_slots(agent["agentUuid"]) == 0  # given back after the call


def test_a_handed_slot_whose_lease_ran_out_and_was_taken_is_not_used(
    user: Api, sent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stage started so late that its handed slot's lease had run out, and another stage
    took the slot: it calls no agent on it, but looks for a slot like any other (and, the
    agent full, waits)."""
    from chalicelib.core.api import parse_run_ref
    from chalicelib.engine import handlers, stages

    agent = register_agent(user, unique_capability("handed-lapsed"), maxConcurrentTasks=1)
    run_id = parse_run_ref(submit(user, agent["capabilities"][0]))
    claimed = stages.claim_stage(run_id, "s0")
    assert claimed is not None
    lapsed = _handed_slot(agent, time.time() - selection.SLOT_MARGIN_SECONDS - 1)
    taken = selection._reserve(agent["agentUuid"], 1, time.time() + 60)
    assert isinstance(taken, str)  # the lapsed lease was pruned, its place taken
    called: list[Any] = []
    monkeypatch.setattr(handlers, "call_agent", lambda *args: called.append(args))
    try:
        assert handlers._run_claimed(claimed, handlers.Invocation(), handed=lapsed) == "waiting"
        assert called == []
        assert selection.live_slots(agent["agentUuid"]) == 1
    finally:
        selection.release(replace(lapsed, slot=taken))


def test_a_slot_extended_a_lease_or_more_before_its_cap_is_carried_by_the_renewals(
    user: Api, short_leases: int
) -> None:
    """Extending a slot whose lease in Redis is a renewal's (its cap a lease away or more)
    costs no round trip: the next renewal carries the new cap."""
    agent = register_agent(user, unique_capability("extend-later"), maxConcurrentTasks=1)
    choice = _handed_slot(agent, time.time() + 60)
    key = f"maof:agents:slots:{agent['agentUuid']}"
    before = cache.get_redis().zscore(key, str(choice.slot))
    until = time.time() + 120
    assert selection.extend(choice, until) is choice
    assert cache.get_redis().zscore(key, str(choice.slot)) == before
    cap = selection._held_slots[(agent["agentUuid"], str(choice.slot))]
    assert cap == pytest.approx(until + selection.SLOT_MARGIN_SECONDS)
    selection.renew_slots()
    assert cache.get_redis().zscore(key, str(choice.slot)) == pytest.approx(
        time.time() + short_leases, abs=0.5
    )
    selection.release(choice)


def test_giving_a_slot_back_twice_frees_one_slot_only(user: Api) -> None:
    capability = unique_capability("idem")
    agent = register_agent(user, capability, maxConcurrentTasks=2)
    first = selection._reserve(agent["agentUuid"], 2, time.time() + 60)
    second = selection._reserve(agent["agentUuid"], 2, time.time() + 60)
    assert isinstance(first, str) and isinstance(second, str)
    choice = selection.AgentChoice(agent["agentUuid"], "a", "mock://x", "t", 2, slot=first)
    selection.release(choice)
    selection.release(choice)
    assert selection.live_slots(agent["agentUuid"]) == 1


def test_slots_redis_lost_are_put_back_by_the_next_renewal_and_given_back_ones_never(
    user: Api,
) -> None:
    """Redis restarted without its data (or flushed) forgets the slots of calls still
    running; renewing only what it still had (ZADD XX) never put them back, and the agent
    got more calls at once than its slots until those calls ended (up to 870 s)."""
    capability = unique_capability("lost-slots")
    agent = register_agent(user, capability, maxConcurrentTasks=2)
    running = selection._reserve(agent["agentUuid"], 2, time.time() + 60)
    ended = selection._reserve(agent["agentUuid"], 2, time.time() + 60)
    assert isinstance(running, str) and isinstance(ended, str)
    selection.release(selection.AgentChoice(agent["agentUuid"], "a", "mock://x", "t", 2, ended))
    cache.get_redis().delete(f"maof:agents:slots:{agent['agentUuid']}")  # Redis lost them
    assert selection.live_slots(agent["agentUuid"]) == 0
    selection.renew_slots()
    assert selection.live_slots(agent["agentUuid"]) == 1, "the running call's, not the ended one's"
    selection.release(selection.AgentChoice(agent["agentUuid"], "a", "mock://x", "t", 2, running))
    selection.renew_slots()
    assert selection.live_slots(agent["agentUuid"]) == 0


# ------------------------------------------------------------------ waiting and hand-off


def test_a_waiting_stage_starts_within_100_ms_of_a_slot_being_released(
    user: Api, poller: Any, timed: list[TimedAgent]
) -> None:
    agent = timed_agent(timed, seconds=0.5)
    capability = unique_capability("handoff")
    register_agent(user, capability, endpoint=agent.url, maxConcurrentTasks=1)
    first = submit(user, capability)
    wait_until(lambda: len(agent.calls) == 1, timeout=10)
    second = submit(user, capability)  # finds the only slot taken: waits in Postgres
    for run in (first, second):
        assert wait_for_run(user, run)["status"] == "completed"
    one, two = sorted(agent.calls, key=lambda c: c.started)
    assert one.ended is not None
    gap = two.started - one.ended
    # The hand-off itself takes a few ms; the margin is for a busy machine.
    assert gap < 0.1 * 3, f"the waiting stage started {gap * 1000:.0f} ms after the slot freed"
    entries = user.get(f"/workflows/{second}/audit").json()["data"]["logs"]
    assert [e["action"] for e in entries].count("wait") == 1  # one wait entry per stage


def test_the_sweeper_wakes_a_waiting_stage_whose_hand_off_was_lost(
    user: Api, poller: Any, timed: list[TimedAgent]
) -> None:
    agent = timed_agent(timed, seconds=0.05)
    capability = unique_capability("lost-handoff")
    register_agent(user, capability, endpoint=agent.url, maxConcurrentTasks=1)
    run_ref = submit(user, capability)
    assert wait_for_run(user, run_ref)["status"] == "completed"
    # A stage parked while the slot was taken, and the worker that freed it died before
    # handing it over: nothing will wake it but the sweeper.
    parked = submit(user, capability)
    wait_for_run(user, parked)  # it ran (slot free): make it wait again, as if it had not
    _waiting_since(parked, 3600)
    assert sweeper.sweep_once()["woken"] >= 1
    wait_until(lambda: _stage_status(user, parked) == "completed", timeout=20)


def test_the_sweeper_leaves_a_stage_waiting_while_every_slot_is_taken(
    user: Api, poller: Any, timed: list[TimedAgent]
) -> None:
    # Each release hands the slot to the next waiting stage: woken meanwhile, the stage
    # would only go round the queue to wait again. Once a slot is free, it is woken; and
    # past MAOF_SWEEP_BACKLOG_AFTER_SECONDS it is woken whatever the counts say.
    agent = timed_agent(timed, seconds=0.05)
    capability = unique_capability("full")
    registered = register_agent(user, capability, endpoint=agent.url, maxConcurrentTasks=1)
    parked = submit(user, capability)
    wait_for_run(user, parked)
    held = selection._reserve(registered["agentUuid"], 1, time.time() + 60)
    assert isinstance(held, str)  # a call in flight holds the agent's one slot
    _waiting_since(parked, get_settings().sweep_queued_after_seconds + 30)
    sweeper.sweep_once()
    assert _stage_status(user, parked) == "waiting"
    _waiting_since(parked, get_settings().sweep_backlog_after_seconds + 30)
    sweeper.sweep_once()  # woken: a worker finds the slot taken, and it waits again
    wait_until(lambda: _stage_status(user, parked) == "waiting" and _waits(parked) == 1)
    selection.release(selection.AgentChoice(registered["agentUuid"], "", "", "", 1, slot=held))
    _waiting_since(parked, get_settings().sweep_queued_after_seconds + 30)
    sweeper.sweep_once()
    wait_until(lambda: _stage_status(user, parked) == "completed", timeout=20)


def test_a_woken_stage_whose_send_fails_waits_again_and_no_other_runs_send_is_skipped(
    user: Api, sent: Any, monkeypatch: pytest.MonkeyPatch, nothing_else_stalled: None
) -> None:
    """The sweeper commits the stages it wakes as queued, then sends them run by run: the
    first send SQS refused (throttled) ended the round, so later runs' woken stages were
    never sent, and the next sweep re-sent them as lost messages (requeues + 1, audit
    'message not consumed'). Each run's send is tried; a stage whose send failed waits
    again as it was, to be woken by the next round, uncounted."""
    capability = unique_capability("wakesend")
    register_agent(user, capability)
    runs = [submit_direct(user, chain(capability, "a")) for _ in range(3)]
    long_wait = get_settings().sweep_backlog_after_seconds + 60
    with session_scope() as session:
        for older, run_id in enumerate(runs):  # the first run parked longest: woken first
            session.execute(
                text(
                    "UPDATE stage_executions SET status = 'waiting', "
                    "parked_at = now() - make_interval(secs => :age), "
                    "queued_at = now() - make_interval(secs => :age) WHERE run_id = :r"
                ),
                {"r": run_id, "age": long_wait + 60 * (len(runs) - older)},
            )
    waiting_since = stage_row(runs[0], "a").queued_at
    tried: list[uuid.UUID] = []

    def send(run_id: uuid.UUID, stage_ids: list[str], *args: Any, **kwargs: Any) -> None:
        tried.append(run_id)
        if run_id == runs[0]:
            raise RuntimeError("SendMessageBatch throttled")
        sent(run_id, stage_ids, *args, **kwargs)

    monkeypatch.setattr(sweeper, "send_stage_messages", send)
    monkeypatch.setattr(sweeper, "queue_backlog", lambda: 0)
    totals = sweeper.sweep_once()
    assert set(runs) <= set(tried), f"sends tried for {set(runs) & set(tried)} of {runs}"
    assert [stage_row(r, "a").status for r in runs] == ["waiting", "queued", "queued"]
    assert stage_row(runs[0], "a").queued_at == waiting_since  # its place in line kept
    assert totals["woken"] >= 2 and totals["errors"] >= 1, totals
    monkeypatch.setattr(sweeper, "send_stage_messages", sent)
    sweeper.sweep_once()  # the next round wakes it again
    row = stage_row(runs[0], "a")
    assert (row.status, row.requeues) == ("queued", 0)
    assert (runs[0], "a") in sent.sent
    assert ("requeue", "a") not in audit_actions(runs[0])


def test_one_users_long_waiting_backlog_never_keeps_the_sweeper_from_others_stages(
    user: Api, api: Api, sent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's stages waiting for hours behind their own full agent, more than a sweep
    round wakes, took every place in it (oldest first, those past
    MAOF_SWEEP_BACKLOG_AFTER_SECONDS whatever the counts say): another user's stage whose
    hand-off was lost, with its own agent's slots free, was never woken. The stages a slot
    may be free for are woken first; the long waits in a smaller batch, each user's in turn."""
    from chalicelib.core.api import parse_run_ref

    monkeypatch.setattr(sweeper, "WAKE_LIMIT", 10)
    monkeypatch.setattr(sweeper, "LONG_WAIT_WAKE_LIMIT", 5, raising=False)
    hog_capability, their_capability = unique_capability("hog"), unique_capability("free")
    full = [register_agent(user, hog_capability, maxConcurrentTasks=1)]
    someone, another = api.as_new_user(), api.as_new_user()
    register_agent(someone, their_capability, maxConcurrentTasks=5)  # every slot free
    full.append(register_agent(another, hog_capability, maxConcurrentTasks=1))
    held = [selection._reserve(agent["agentUuid"], 1, time.time() + 120) for agent in full]
    assert all(isinstance(slot, str) for slot in held)  # both full agents' one slot taken
    hog = [submit(user, hog_capability, stages=10) for _ in range(2)]
    lost = submit(someone, their_capability)  # sent, not run: its hand-off lost, say
    patient = submit(another, hog_capability)
    try:
        with session_scope() as session:
            for refs, age in ((hog, 3 * 3600), ([patient], 2 * 3600), ([lost], 60)):
                session.execute(
                    text(
                        "UPDATE stage_executions SET status = 'waiting', "
                        "parked_at = now() - make_interval(secs => :age), "
                        "queued_at = now() - make_interval(secs => :age) "
                        "WHERE run_id = ANY(:runs)"
                    ),
                    {"runs": [parse_run_ref(ref) for ref in refs], "age": age},
                )
        woken = {run_id: len(stage_ids) for run_id, stage_ids in sweeper.wake_waiting().items()}
        assert woken.get(parse_run_ref(lost)) == 1, "a stage with a slot free was left waiting"
        assert woken.get(parse_run_ref(patient)) == 1, "another user's long wait was passed over"
        assert sum(woken.get(parse_run_ref(ref), 0) for ref in hog) == 4  # the batch's rest
    finally:
        for client, refs in ((user, hog), (someone, [lost]), (another, [patient])):
            for ref in refs:
                client.post(f"/workflows/{ref}/cancel")
        for agent, slot in zip(full, held, strict=True):
            selection.release(selection.AgentChoice(agent["agentUuid"], "", "", "", 1, slot=slot))


def test_one_users_stages_woken_for_room_they_cannot_use_never_keep_others_from_the_round(
    user: Api, api: Api, sent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's stages fell back from an agent that fails fast (free, but in their
    tried_agents) to a full one: a slot "may be free" for them every round, so, oldest
    first, they filled the round each time (each went round the queue to wait again), and
    another user's stage with a lost hand-off and its own agent's slots free was not woken.
    The round takes each user's oldest in turn."""
    from chalicelib.core.api import parse_run_ref

    monkeypatch.setattr(sweeper, "WAKE_LIMIT", 4)
    hog_capability, their_capability = unique_capability("hog"), unique_capability("free")
    flaky = register_agent(user, hog_capability, maxConcurrentTasks=5)  # free, but tried
    busy = register_agent(user, hog_capability, maxConcurrentTasks=1)
    someone = api.as_new_user()
    register_agent(someone, their_capability, maxConcurrentTasks=5)  # every slot free
    held = selection._reserve(busy["agentUuid"], 1, time.time() + 120)
    assert isinstance(held, str)
    hog = submit(user, hog_capability, stages=10)
    lost = submit(someone, their_capability)  # sent, not run: its hand-off lost, say
    try:
        with session_scope() as session:
            for ref, age, tried in ((hog, 120, [flaky["agentUuid"]]), (lost, 60, [])):
                session.execute(
                    text(
                        "UPDATE stage_executions SET status = 'waiting', "
                        "tried_agents = CAST(:tried AS uuid[]), "
                        "parked_at = now() - make_interval(secs => :age), "
                        "queued_at = now() - make_interval(secs => :age) WHERE run_id = :run"
                    ),
                    {"run": parse_run_ref(ref), "age": age, "tried": tried},
                )
        woken = {run_id: len(stage_ids) for run_id, stage_ids in sweeper.wake_waiting().items()}
        assert woken.get(parse_run_ref(lost)) == 1, "a stage with a slot free was left waiting"
        assert woken.get(parse_run_ref(hog)) == 3  # the round's rest
    finally:
        for client, ref in ((user, hog), (someone, lost)):
            client.post(f"/workflows/{ref}/cancel")
        selection.release(selection.AgentChoice(busy["agentUuid"], "", "", "", 1, slot=held))


def test_the_sweepers_capacity_look_takes_the_same_redis_round_trips_however_many_pairs_wait(
    user: Api, sent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweeper asks whether a slot may be free for every (capability, owner) with a
    stage waiting: one look each took two or three Redis round trips (1,000 pairs of one
    user's: 0.4-0.8 s a round, every 5 s). They are now read in a few pipelines in all."""
    import redis

    capabilities = [unique_capability("pairs") for _ in range(30)]
    agents = [
        register_agent(user, capabilities[k], capabilities=capabilities[k::3], maxConcurrentTasks=1)
        for k in range(3)
    ]
    held = [selection._reserve(agent["agentUuid"], 1, time.time() + 120) for agent in agents]
    assert all(isinstance(slot, str) for slot in held)  # every agent full
    body = [{"id": f"s{i}", "name": "S", "agentCapability": c} for i, c in enumerate(capabilities)]
    run_id = submit_direct(user, body)
    round_trips = 0
    execute = redis.client.Pipeline.execute

    def counted(pipe: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal round_trips
        round_trips += 1
        return execute(pipe, *args, **kwargs)

    try:
        with session_scope() as session:
            session.execute(
                text(
                    "UPDATE stage_executions SET status = 'waiting', "
                    "parked_at = now() - interval '30 seconds', "
                    "queued_at = now() - interval '30 seconds' WHERE run_id = :r"
                ),
                {"r": run_id},
            )
        assert run_id not in sweeper.wake_waiting()  # every agent full: left waiting
        with monkeypatch.context() as patch:
            patch.setattr(redis.client.Pipeline, "execute", counted)
            assert run_id not in sweeper.wake_waiting()
        assert round_trips <= 3, f"{round_trips} Redis round trips for 30 capabilities"
    finally:
        user.post(f"/workflows/wfr-{run_id}/cancel")
        for agent, slot in zip(agents, held, strict=True):
            selection.release(selection.AgentChoice(agent["agentUuid"], "", "", "", 1, slot=slot))


def test_another_users_full_private_agent_never_makes_a_stage_wait(
    user: Api, api: Api, poller: Any
) -> None:
    """Only agents that may serve the run count: a run with no agent of its own (or shared)
    for a capability fails at once, even while another user's private agent with that
    capability is full, and never waits on it (nor learns whether it is busy)."""
    from chalicelib.core.api import parse_run_ref

    capability = unique_capability("theirs")
    other = api.as_new_user()
    theirs = register_agent(other, capability, maxConcurrentTasks=1)
    held = selection._reserve(theirs["agentUuid"], 1, time.time() + 60)
    assert isinstance(held, str)
    mine = uuid.UUID(str(user.get("/auth/me").json()["data"]["userUuid"]))
    assert selection.may_have_room(capability, mine) is True  # nothing may serve it: no wait
    assert selection.may_have_room(capability, uuid.UUID(theirs["ownerUserUuid"])) is False
    run_ref = submit(user, capability)
    run = wait_for_run(user, run_ref)
    assert run["status"] == "failed", run
    assert "No available agent" in str(run["stages"][0]["errorMessage"])
    assert _waits(run_ref) == 0
    audit = user.get(f"/workflows/{run_ref}/audit").json()["data"]["logs"]
    assert "wait" not in {entry["action"] for entry in audit}
    assert parse_run_ref(run_ref) not in {r for r, _ in stages_waiting()}


def stages_waiting() -> list[tuple[uuid.UUID, str]]:
    with session_scope() as session:
        rows = session.execute(
            text("SELECT run_id, stage_id FROM stage_executions WHERE status = 'waiting'")
        ).all()
    return [(row.run_id, row.stage_id) for row in rows]


def _waiting_since(run_ref: str, seconds: float) -> None:
    """The run's stages waiting for a slot (for `seconds`), as if they had never run."""
    from chalicelib.core.api import parse_run_ref

    run_id = parse_run_ref(run_ref)
    with session_scope() as session:
        session.execute(
            text(
                "UPDATE stage_executions SET status = 'waiting', parked_at = now(), "
                "queued_at = now() - make_interval(secs => :age), completed_at = NULL, "
                "output = NULL WHERE run_id = :r"
            ),
            {"r": run_id, "age": seconds},
        )
        session.execute(
            text(
                "UPDATE workflow_runs SET status = 'in_progress', completed_at = NULL WHERE id = :r"
            ),
            {"r": run_id},
        )


def _waits(run_ref: str) -> int:
    from chalicelib.core.api import parse_run_ref

    with session_scope() as session:
        return int(
            session.execute(
                text("SELECT max(waits) FROM stage_executions WHERE run_id = :r"),
                {"r": parse_run_ref(run_ref)},
            ).scalar_one()
        )


def _stage_status(client: Api, run_ref: str) -> str:
    return str(client.get(f"/workflows/{run_ref}").json()["data"]["stages"][0]["status"])


def test_a_big_fan_out_does_not_starve_another_users_small_run(
    admin: Api, api: Api, poller: Any, timed: list[TimedAgent]
) -> None:
    agent = timed_agent(timed, seconds=0.1)
    capability = unique_capability("fair")
    register_agent(admin, capability, endpoint=agent.url, maxConcurrentTasks=2, visibility="shared")
    big = submit(admin, capability, stages=40, name="fan-out")
    wait_until(lambda: len(agent.calls) >= 2, timeout=10)
    someone = api.as_new_user()
    small = submit(someone, capability, name="small")
    assert wait_for_run(admin, big, timeout=60)["status"] == "completed"
    done = wait_for_run(someone, small)
    assert done["status"] == "completed"
    # From when the small run's stage got in line (it waited: both slots were busy), how
    # many of the fan-out's stages went before it: the two in flight, and at most one or
    # two hand-offs under way; not the 30-odd older stages of the fan-out still waiting.
    in_line = datetime.fromisoformat(done["stages"][0]["queuedAt"]).timestamp()
    [mine] = [c for c in agent.calls if c.run_id == small]
    later = [c for c in agent.calls if c.run_id == big and c.began_at >= in_line]
    assert len(later) >= 10, "the fan-out still had stages waiting when the small run arrived"
    ahead = [c for c in later if c.began_at < mine.began_at]
    assert len(ahead) <= 4, f"{len(ahead)} fan-out stages started before it, once it was in line"


def test_one_users_many_small_runs_do_not_keep_another_users_run_waiting(
    admin: Api, api: Api, sent: Any
) -> None:
    """Fairness is across users: a run holds at most 100 stages, so a big fan-out is many
    runs. One user's 30 one-stage runs wait for a shared agent, one of theirs in progress on
    it; another user's run, waiting since after all of them, is handed the next slot (it
    tied with each of the 29 runs with none in progress, and went behind them: they had
    waited longer). Stages in progress on other agents do not count against a user."""
    from chalicelib.core.api import parse_run_ref
    from chalicelib.engine import stages

    capability = unique_capability("fair-users")
    agent = register_agent(admin, capability, maxConcurrentTasks=1, visibility="shared")
    elsewhere = register_agent(admin, capability, maxConcurrentTasks=5, visibility="shared")
    held = [
        selection._reserve(agent["agentUuid"], 1, time.time() + 60),
        *(selection._reserve(elsewhere["agentUuid"], 5, time.time() + 60) for _ in range(5)),
    ]
    assert all(isinstance(slot, str) for slot in held)  # every slot taken: submissions wait
    someone = api.as_new_user()
    busy = [parse_run_ref(submit(someone, capability)) for _ in range(2)]
    mine = [parse_run_ref(submit(admin, capability, name="split-fan-out")) for _ in range(30)]
    theirs = parse_run_ref(submit(someone, capability, name="small"))
    try:
        for run_id, on in [(busy[0], elsewhere), (busy[1], elsewhere), (mine[0], agent)]:
            claimed = stages.claim_stage(run_id, "s0", waiting=True)  # its call under way
            assert claimed is not None
            assigned = stages.assign_agent(claimed, on["agentUuid"], on["agentId"], 1)
            assert assigned is stages.AssignResult.ASSIGNED
        assert stages.next_waiting(agent["agentUuid"], limit=2) == [
            (theirs, "s0"),
            (mine[1], "s0"),
        ]
        handed = stages.claim_next_waiting(agent["agentUuid"])
        assert handed is not None and handed.run_id == theirs
    finally:
        for client, runs in ((someone, [*busy, theirs]), (admin, mine)):
            for run_id in runs:
                client.post(f"/workflows/wfr-{run_id}/cancel")
        for slot, on in zip(held, [agent, *[elsewhere] * 5], strict=True):
            selection.release(selection.AgentChoice(on["agentUuid"], "", "", "", 1, slot=slot))


def test_the_stage_handing_its_slot_on_is_counted_for_no_one(
    admin: Api, api: Api, sent: Any
) -> None:
    """A 2-slot agent runs one stage of user A and one of B. A's call returns: its worker
    hands the slot on while A's stage is still in progress. Counted for A, A and B tied
    and B's stage that had waited longer took the slot: B then held both, A none."""
    from chalicelib.core.api import parse_run_ref
    from chalicelib.engine import stages

    capability = unique_capability("fair-self")
    agent = register_agent(admin, capability, maxConcurrentTasks=2, visibility="shared")
    held = [selection._reserve(agent["agentUuid"], 2, time.time() + 60) for _ in range(2)]
    assert all(isinstance(slot, str) for slot in held)  # every slot taken: submissions wait
    a, b = api.as_new_user(), api.as_new_user()
    refs = {
        "a1": submit(a, capability),
        "b1": submit(b, capability),
        "b2": submit(b, capability),
        "a2": submit(a, capability),
    }
    ids = {name: parse_run_ref(ref) for name, ref in refs.items()}
    try:
        with session_scope() as session:  # b2 has waited longer than a2
            for name, age in (("b2", 10), ("a2", 5)):
                session.execute(
                    text(
                        "UPDATE stage_executions SET parked_at = now() - make_interval(secs => :s)"
                        " WHERE run_id = :r"
                    ),
                    {"r": ids[name], "s": age},
                )
        running = {}
        for name in ("a1", "b1"):
            claimed = stages.claim_stage(ids[name], "s0", waiting=True)  # its call under way
            assert claimed is not None
            assigned = stages.assign_agent(claimed, agent["agentUuid"], agent["agentId"], 1)
            assert assigned is stages.AssignResult.ASSIGNED
            running[name] = claimed
        releasing = running["a1"].claim_token
        assert stages.next_waiting(agent["agentUuid"], limit=2, releasing=releasing) == [
            (ids["a2"], "s0"),
            (ids["b2"], "s0"),
        ]
        handed = stages.claim_next_waiting(agent["agentUuid"], releasing)
        assert handed is not None and handed.run_id == ids["a2"]
    finally:
        for client, names in ((a, ["a1", "a2"]), (b, ["b1", "b2"])):
            for name in names:
                client.post(f"/workflows/{refs[name]}/cancel")
        for slot in held:
            selection.release(selection.AgentChoice(agent["agentUuid"], "", "", "", 2, slot=slot))


def _stage_rows_read_by_a_release(agent_uuid: str) -> int:
    """The stage rows next_waiting's query reads (EXPLAIN ANALYZE), kept or filtered out."""
    from chalicelib.engine import stages

    def read(plan: dict[str, Any]) -> int:
        rows = 0
        if plan.get("Relation Name") == "stage_executions":
            kept = plan["Actual Rows"] + plan.get("Rows Removed by Filter", 0)
            rows = (kept + plan.get("Rows Removed by Index Recheck", 0)) * plan["Actual Loops"]
        return rows + sum(read(child) for child in plan.get("Plans", []))

    explain = "EXPLAIN (ANALYZE, FORMAT JSON) " + stages._NEXT_WAITING_SQL.format(limit=1)
    with session_scope() as session:
        params = {"agent_uuid": uuid.UUID(agent_uuid), "releasing": None}
        [plan] = session.execute(text(explain), params).scalar_one()
    return read(plan["Plan"])


def test_a_release_reads_each_waiting_runs_head_not_every_waiting_stage(
    user: Api, sent: Any
) -> None:
    """A freed slot picks among the heads of the runs waiting for its agent: what it reads
    does not grow with the stages each run has waiting (it read and sorted every waiting
    stage: 205 ms behind one user's 25,000; the quota allows 50,000). A run's head is its
    stage that first began to wait among those of any of the agent's capabilities."""
    from chalicelib.engine import stages

    first, second = unique_capability("heads-a"), unique_capability("heads-b")
    agent = register_agent(user, first, capabilities=[first, second], maxConcurrentTasks=1)
    held = selection._reserve(agent["agentUuid"], 1, time.time() + 60)
    assert isinstance(held, str)  # the one slot taken: submissions wait
    body = [
        {"id": f"s{i}", "name": f"S{i}", "agentCapability": (first, second)[i % 2]}
        for i in range(50)
    ]
    runs = [submit_direct(user, body) for _ in range(12)]
    try:
        with session_scope() as session:  # in line by run; in each run, s7 first
            for age, run_id in enumerate(reversed(runs)):
                session.execute(
                    text(
                        "UPDATE stage_executions SET status = 'waiting', parked_at = now() - "
                        "make_interval(secs => :age * 100 + CASE WHEN stage_id = 's7' "
                        "THEN 50 ELSE position END) WHERE run_id = :r"
                    ),
                    {"r": run_id, "age": age},
                )
            session.execute(text("ANALYZE stage_executions"))
        assert stages.next_waiting(agent["agentUuid"], limit=12) == [(r, "s7") for r in runs]
        behind_all = _stage_rows_read_by_a_release(agent["agentUuid"])
        with session_scope() as session:  # the same runs with 2 stages waiting each, not 50
            session.execute(
                text(
                    "UPDATE stage_executions SET status = 'pending' WHERE run_id = ANY(:runs) "
                    "AND stage_id NOT IN ('s7', 's8')"
                ),
                {"runs": runs},
            )
        assert stages.next_waiting(agent["agentUuid"], limit=12) == [(r, "s7") for r in runs]
        behind_two = _stage_rows_read_by_a_release(agent["agentUuid"])
        # Reading every waiting stage read 1,200 rows here (each of the 600 twice). The
        # planner's choice on a test database this small varies with what other tests left
        # in it (50 or 141 rows seen behind 50 a run, 50 behind 2), so the bound is a
        # fraction of the stages waiting, not the 2-a-run figure.
        assert behind_all < len(runs) * len(body) / 2, (
            f"{behind_all} stage rows read behind 50 waiting stages a run, {behind_two} behind 2"
        )
    finally:
        for run_id in runs:
            user.post(f"/workflows/wfr-{run_id}/cancel")
        selection.release(selection.AgentChoice(agent["agentUuid"], "", "", "", 1, slot=held))


def test_an_agent_never_gets_more_calls_at_once_than_its_slots(
    user: Api, poller: Any, timed: list[TimedAgent]
) -> None:
    agent = timed_agent(timed, seconds=0.05)
    capability = unique_capability("cap")
    register_agent(user, capability, endpoint=agent.url, maxConcurrentTasks=3)
    runs = [submit(user, capability, stages=3) for _ in range(12)]
    for run in runs:
        assert wait_for_run(user, run, timeout=60)["status"] == "completed"
    assert len(agent.calls) == 36
    assert agent.peak == 3  # used to the full, never beyond


def test_handing_over_keeps_the_slot_count(user: Api) -> None:
    capability = unique_capability("over")
    agent = register_agent(user, capability, maxConcurrentTasks=1)
    slot = selection._reserve(agent["agentUuid"], 1, time.time() + 60)
    assert isinstance(slot, str)
    choice = selection.AgentChoice(agent["agentUuid"], "a", "mock://x", "t", 1, slot=slot)
    handed = selection.hand_over(choice, time.time() + 60)
    assert handed is not None and handed.slot not in (None, slot)
    assert selection.live_slots(agent["agentUuid"]) == 1
    selection.release(choice)  # the old lease is gone already: nothing changes
    assert selection.live_slots(agent["agentUuid"]) == 1
    selection.release(handed)
    assert selection.live_slots(agent["agentUuid"]) == 0


def test_handing_over_an_expired_slot_taken_meanwhile_exceeds_no_capacity(user: Api) -> None:
    """A worker slow past its lease (Postgres stalled its hand-off): the slot went back
    and another stage took it; handing the old lease over must not make a third call."""
    capability = unique_capability("over-expired")
    agent = register_agent(user, capability, maxConcurrentTasks=2)
    uuid_, limit = agent["agentUuid"], 2
    lapsed = selection._reserve(uuid_, limit, time.time() - selection.SLOT_MARGIN_SECONDS - 1)
    assert isinstance(lapsed, str)
    held = [selection._reserve(uuid_, limit, time.time() + 60) for _ in range(limit)]
    assert all(isinstance(slot, str) for slot in held), "the lapsed lease was pruned"
    choice = selection.AgentChoice(uuid_, "a", "mock://x", "t", limit, slot=lapsed)
    assert selection.hand_over(choice, time.time() + 60) is None
    assert selection.live_slots(uuid_) == limit
    selection.release(selection.AgentChoice(uuid_, "a", "mock://x", "t", limit, slot=held[0]))
    handed = selection.hand_over(choice, time.time() + 60)  # room again: a lease like any
    assert handed is not None and handed.slot not in (None, lapsed)
    assert selection.live_slots(uuid_) == limit


def test_the_hand_off_skips_stages_the_agent_may_not_serve(user: Api, api: Api, sent: Any) -> None:
    """Another user's waiting stage is never handed a private agent's slot."""
    capability = unique_capability("private-handoff")
    mine = register_agent(user, capability)
    other = api.as_new_user()
    register_agent(other, capability)
    from chalicelib.engine import stages

    run_ref = submit(other, capability)
    from chalicelib.core.api import parse_run_ref

    run_id = parse_run_ref(run_ref)
    claimed = stages.claim_stage(run_id, "s0")
    assert claimed is not None
    assert stages.park_stage(claimed, "full") is stages.Requeued.QUEUED
    assert stages.next_waiting(mine["agentUuid"]) == []


def test_a_stage_kept_for_an_agent_since_deleted_is_handed_the_others_slots(
    user: Api, sent: Any
) -> None:
    """A retry goes back to the agent that failed (its Idempotency-Key kept). That agent
    deleted, the stage waited behind the other, full agent still marked for the first:
    no release of the other's ever handed it a slot (later runs' stages were served
    first) and the sweeper left it while the other was full: it waited for ever."""
    from chalicelib.core.api import parse_run_ref
    from chalicelib.engine import handlers, stages

    capability = unique_capability("kept")
    first_agent = register_agent(user, capability)
    other = register_agent(user, capability, maxConcurrentTasks=1)
    first = parse_run_ref(submit(user, capability))
    claimed = stages.claim_stage(first, "s0")
    assert claimed is not None
    retry = stages.requeue_later(  # the first agent answered a retryable error
        claimed,
        0,
        "retry",
        agent_uuid=uuid.UUID(first_agent["agentUuid"]),
        agent_id=first_agent["agentId"],
        agent_attempts=1,
        tried_agents=[],
        next_attempt=False,
        details={"error": "busy"},
    )
    assert retry is stages.Requeued.QUEUED
    assert user.delete(f"/agents/{first_agent['agentUuid']}").status_code == 200
    held = selection._reserve(other["agentUuid"], 1, time.time() + 60)
    assert isinstance(held, str)
    assert handlers.run_stage(first, "s0") == "waiting"  # the first agent gone, the other full
    second = parse_run_ref(submit(user, capability))  # a later run, waiting from the start
    assert stages.next_waiting(other["agentUuid"]) == [(first, "s0"), (second, "s0")]


def test_a_freed_slot_is_never_handed_to_a_waiting_stage_on_an_agent_marked_offline(
    user: Api, sent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline agents are never routed to. The health check marks the agent offline while
    its one slot is busy and a stage waits for it: the call's release hands the stage
    nothing (nor does the look after it), Postgres refuses the agent to a stage whose
    worker chose it from a list read before the check, and the sweeper wakes the waiting
    stage to fail for want of an agent."""
    from chalicelib.agents import health
    from chalicelib.core.api import parse_run_ref
    from chalicelib.engine import handlers, stages

    capability = unique_capability("offline-handoff")
    agent, choice, run_id = _parked_behind_a_full_agent(user, capability)
    monkeypatch.setattr(health, "probe", lambda endpoint: "offline")
    checked = user.post(f"/agents/{agent['agentUuid']}/health-check")
    assert checked.json()["data"]["status"] == "offline"
    assert stages.next_waiting(agent["agentUuid"]) == []
    group = handlers.TaskGroup()
    invocation = handlers.Invocation(group=group)
    assert handlers._hand_off(choice, invocation) is False  # the call ends: nothing handed
    assert selection.settle(choice, True, 10.0) is True  # the agent was full
    handlers._after_release(choice, invocation)
    group.wait()
    assert _stage_status(user, f"wfr-{run_id}") == "waiting"
    assert selection.live_slots(agent["agentUuid"]) == 0

    later = stages.claim_stage(parse_run_ref(submit(user, capability)), "s0")
    assert later is not None
    assigned = stages.assign_agent(later, agent["agentUuid"], agent["agentId"], later.attempt)
    assert assigned is stages.AssignResult.AGENT_INELIGIBLE
    assert handlers._run_claimed(later, handlers.Invocation()) == "failed"

    monkeypatch.setattr(sweeper, "send_stage_messages", sent)
    _waiting_since(f"wfr-{run_id}", get_settings().sweep_queued_after_seconds + 30)
    assert sweeper.sweep_once()["woken"] >= 1
    assert handlers.run_stage(run_id, "s0") == "failed"
    run = user.get(f"/workflows/wfr-{run_id}").json()["data"]
    assert "No available agent" in str(run["stages"][0]["errorMessage"])


def test_a_stage_woken_and_made_to_wait_again_keeps_its_place_in_line(
    user: Api, sent: Any, monkeypatch: pytest.MonkeyPatch, nothing_else_stalled: None
) -> None:
    """A waiting stage is in line by when it first began to wait. The sweeper wakes the one
    that has waited longest (past MAOF_SWEEP_BACKLOG_AFTER_SECONDS); finding the agent full
    again, it waits again: ahead of a stage that began waiting after it, not behind it (its
    claim used to forget when it began, and behind a long backlog the oldest stages were
    pushed back again and again)."""
    from chalicelib.core.api import parse_run_ref
    from chalicelib.engine import handlers, stages

    monkeypatch.setattr(sweeper, "send_stage_messages", sent)
    capability = unique_capability("line")
    agent = register_agent(user, capability, maxConcurrentTasks=1)
    held = selection._reserve(agent["agentUuid"], 1, time.time() + 120)
    assert isinstance(held, str)  # a long call holds the one slot
    older = parse_run_ref(submit(user, capability))  # waits from its submission
    newer = parse_run_ref(submit(user, capability))
    with session_scope() as session:  # the older one began waiting long ago
        session.execute(
            text(
                "UPDATE stage_executions SET queued_at = now() - make_interval(secs => :s), "
                "parked_at = now() - make_interval(secs => :s) WHERE run_id = :r"
            ),
            {"r": older, "s": get_settings().sweep_backlog_after_seconds + 30},
        )
    assert stages.next_waiting(agent["agentUuid"]) == [(older, "s0"), (newer, "s0")]
    try:
        assert sweeper.sweep_once()["woken"] == 1
        assert handlers.run_stage(older, "s0") == "waiting"  # still full: it waits again
        assert _waits(f"wfr-{older}") == 2
        assert stages.next_waiting(agent["agentUuid"]) == [(older, "s0"), (newer, "s0")]
    finally:
        selection.release(selection.AgentChoice(agent["agentUuid"], "", "", "", 1, slot=held))


def _parked_behind_a_full_agent(user: Api, capability: str) -> tuple[dict[str, Any], Any, Any]:
    """An agent with one slot, taken by a call about to end; a stage parked behind it
    after the caller's hand-off had looked (so only a look after the release finds it)."""
    from chalicelib.core.api import parse_run_ref
    from chalicelib.engine import stages

    agent = register_agent(user, capability, maxConcurrentTasks=1)
    slot = selection._reserve(agent["agentUuid"], 1, time.time() + 60)
    assert isinstance(slot, str)
    [listed] = selection.eligible(capability, uuid.UUID(agent["ownerUserUuid"]))
    choice = selection.AgentChoice(
        agent["agentUuid"], agent["agentId"], listed["endpoint"], listed["tokenEncrypted"], 1, slot
    )
    run_id = parse_run_ref(submit(user, capability))
    # Submitted while every slot is taken: the stage waits from the start, no message sent.
    assert stages.next_waiting(agent["agentUuid"]) == [(run_id, "s0")]
    return agent, choice, run_id


def test_a_stage_that_parked_just_before_a_release_is_not_left_waiting(
    user: Api, sent: Any
) -> None:
    from chalicelib.engine import handlers

    capability = unique_capability("race")
    _, choice, run_id = _parked_behind_a_full_agent(user, capability)
    group = handlers.TaskGroup()
    invocation = handlers.Invocation(group=group)
    # The call ends; its hand-off looked before the stage parked, so it released the slot.
    assert selection.settle(choice, True, 10.0) is True  # the agent was full
    handlers._after_release(choice, invocation)
    group.wait()
    run = user.get(f"/workflows/wfr-{run_id}").json()["data"]
    assert run["stages"][0]["status"] == "completed", run


def test_past_the_hand_off_budget_a_freed_slot_wakes_the_next_stage_through_sqs(
    user: Api, sent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chalicelib.engine import handlers

    capability = unique_capability("budget")
    _, choice, run_id = _parked_behind_a_full_agent(user, capability)
    invocation = handlers.Invocation(
        group=handlers.TaskGroup(),
        started=time.monotonic() - handlers.HANDOFF_BUDGET_SECONDS - 1,
    )
    assert handlers._hand_off(choice, invocation) is False  # not run here any more
    assert selection.settle(choice, True, 10.0) is True
    handlers._after_release(choice, invocation)
    run = user.get(f"/workflows/wfr-{run_id}").json()["data"]
    assert run["stages"][0]["status"] == "queued"
    assert sent.sent.count((run_id, "s0")) == 1  # woken now (it waited from submission)


def _looks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every look in Postgres for a stage waiting for a slot, by what looked."""
    from chalicelib.engine import stages

    seen: list[str] = []
    for name in ("claim_next_waiting", "next_waiting"):
        real = getattr(stages, name)

        def counted(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            seen.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(stages, name, counted)
    return seen


def test_releases_look_for_waiting_stages_only_once_one_found_the_agent_full(
    user: Api, sent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chalicelib.engine import handlers
    from tests.integration.test_delivery import record

    capability = unique_capability("unwaited")
    agent, choice, _ = _parked_behind_a_full_agent(user, capability)
    assert selection.may_be_waited_for(choice)  # marked before the stage waited
    # Then no stage finds it full for a while: its releases look in no table.
    selection.release(choice)
    handlers.run_stage_batch([record(run_id, "s0") for run_id, _ in stages_waiting_for(agent)])
    cache.get_redis().delete(selection._waited_key(agent["agentUuid"]))
    looks = _looks(monkeypatch)
    run_ref = submit(user, capability, stages=3)
    from chalicelib.core.api import parse_run_ref

    run_id = parse_run_ref(run_ref)
    for stage_id in ("s0", "s1", "s2"):
        assert handlers.run_stage_batch([record(run_id, stage_id)]) == {"batchItemFailures": []}
    assert _stage_status(user, run_ref) == "completed"
    assert looks == []
    assert not selection.may_be_waited_for(choice)
    # A stage that finds it full marks it again, and the next release hands the slot on.
    slot = selection._reserve(agent["agentUuid"], 1, time.time() + 60)
    assert isinstance(slot, str)
    waiting = parse_run_ref(submit(user, capability))
    assert selection.may_be_waited_for(choice)
    group = handlers.TaskGroup()
    handlers._free_slot(
        replace(choice, slot=slot), handlers.Invocation(group=group), True, time.monotonic()
    )
    group.wait()
    assert looks[0] == "claim_next_waiting"
    run = user.get(f"/workflows/wfr-{waiting}").json()["data"]
    assert run["stages"][0]["status"] == "completed", run


def test_without_redis_a_release_looks_for_waiting_stages(user: Api) -> None:
    choice = selection.AgentChoice(str(uuid.uuid4()), "a", "mock://x", "t", 1, slot="s")
    with redis_unreachable():
        assert selection.may_be_waited_for(choice) is True


def stages_waiting_for(agent: dict[str, Any]) -> list[tuple[uuid.UUID, str]]:
    from chalicelib.engine import stages

    return stages.next_waiting(agent["agentUuid"], limit=100)


@pytest.fixture
def sends(monkeypatch: pytest.MonkeyPatch) -> list[tuple[uuid.UUID, str]]:
    """Every stage message sent (by the API or a worker), still sent."""
    from chalicelib.engine import handlers
    from chalicelib.workflows import runs

    seen: list[tuple[uuid.UUID, str]] = []
    send = handlers.send_stage_messages

    def recorded(run_id: uuid.UUID, stage_ids: list[str], *args: Any, **kwargs: Any) -> None:
        seen.extend((run_id, stage_id) for stage_id in stage_ids)
        send(run_id, stage_ids, *args, **kwargs)

    monkeypatch.setattr(handlers, "send_stage_messages", recorded)
    monkeypatch.setattr(runs, "send_stage_messages", recorded)
    return seen


@pytest.mark.parametrize("waits_at", ["submission", "the completion before it"])
def test_a_stage_whose_agents_are_all_full_waits_without_going_round_the_queue(
    user: Api,
    poller: Any,
    timed: list[TimedAgent],
    sends: list[tuple[uuid.UUID, str]],
    waits_at: str,
) -> None:
    """A stage that becomes ready (the run submitted, or the stage before it completed)
    while every agent for it is full waits at once: no SQS message, no claim to find them
    full, one `wait` entry; the next release hands it the slot."""
    from chalicelib.core.api import parse_run_ref

    first, second = unique_capability("first"), unique_capability("second")
    register_agent(user, first)
    slow = timed_agent(timed, seconds=2.0)
    register_agent(user, second, endpoint=slow.url, maxConcurrentTasks=1)
    submit(user, second)  # its call holds the second capability's one slot for 2 s
    wait_until(lambda: len(slow.calls) == 1, timeout=10)
    stages = [{"id": "b", "name": "B", "agentCapability": second}]
    if waits_at != "submission":
        stages = [
            {"id": "a", "name": "A", "agentCapability": first},
            {**stages[0], "dependencies": ["a"]},
        ]
    response = user.post("/workflows/execute", {"workflow": {"name": "bp", "stages": stages}})
    assert response.status_code == 202, response.text
    run_ref = str(response.json()["data"]["workflowRunId"])
    assert wait_for_run(user, run_ref)["status"] == "completed"
    run_id = parse_run_ref(run_ref)
    assert (run_id, "b") not in sends
    assert slow.peak == 1 and len(slow.calls) == 2
    with session_scope() as session:
        waits = session.execute(
            text("SELECT waits FROM stage_executions WHERE run_id = :r AND stage_id = 'b'"),
            {"r": run_id},
        ).scalar_one()
    assert waits == 1
    audit = user.get(f"/workflows/{run_ref}/audit").json()["data"]
    assert [(e["action"], e["stageId"]) for e in audit["logs"]].count(("wait", "b")) == 1
    assert audit["chain"]["valid"] is True


def test_a_slot_taken_for_a_waiting_stage_comes_back_if_its_claim_fails(
    user: Api, sent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The look after a release took a slot for the waiting stage, then the claim failed
    (the database went away): the slot is given back at once, not held to its lease's end
    while the stage waits for it; the stage stays in line for the sweeper."""
    from sqlalchemy.exc import OperationalError

    from chalicelib.engine import handlers, stages

    capability = unique_capability("claim-fails")
    agent, choice, run_id = _parked_behind_a_full_agent(user, capability)
    lost = OperationalError("claim", {}, Exception("connection lost"))

    def no_database(*args: Any, **kwargs: Any) -> None:
        raise lost

    monkeypatch.setattr(stages, "claim_stage", no_database)
    group = handlers.TaskGroup()
    invocation = handlers.Invocation(group=group)
    assert choice.slot is not None
    handlers._after_release(choice, invocation)  # its own slot taken: the agent is full
    selection.release(choice)
    handlers._after_release(choice, invocation)  # a slot taken for s0, its claim fails
    group.wait()
    assert selection.live_slots(agent["agentUuid"]) == 0
    owner = uuid.UUID(agent["ownerUserUuid"])
    handlers._look_again(run_id, ["s0"], capability, owner, invocation)  # the same path
    group.wait()
    assert selection.live_slots(agent["agentUuid"]) == 0
    assert stages.next_waiting(agent["agentUuid"]) == [(run_id, "s0")]


def test_a_slot_taken_by_a_parking_stages_last_look_comes_back_if_its_claim_fails(
    user: Api, sent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stage parks, looks once more, finds the slot freed meanwhile and takes it, then
    claiming itself back fails (the database went away): the slot is given back at once,
    not held (and renewed) to its lease's end while no call uses it and the stage, still
    in line, waits for a release that never comes."""
    from sqlalchemy.exc import OperationalError

    from chalicelib.core.api import parse_run_ref
    from chalicelib.engine import handlers, stages

    capability = unique_capability("park-look-fails")
    agent = register_agent(user, capability, maxConcurrentTasks=1)
    run_id = parse_run_ref(submit(user, capability))
    held = selection._reserve(agent["agentUuid"], 1, time.time() + 60)
    assert isinstance(held, str)  # full when the stage looks: it parks
    park, claim = stages.park_stage, stages.claim_stage

    def park_then_the_call_ends(stage: Any, reason: str) -> Any:
        parked = park(stage, reason)
        selection.release(selection.AgentChoice(agent["agentUuid"], "", "", "", 1, slot=held))
        return parked

    def no_database_for_the_claim_back(*args: Any, waiting: bool = False, **kwargs: Any) -> Any:
        if waiting:
            raise OperationalError("claim", {}, Exception("connection lost"))
        return claim(*args, waiting=waiting, **kwargs)

    monkeypatch.setattr(stages, "park_stage", park_then_the_call_ends)
    monkeypatch.setattr(stages, "claim_stage", no_database_for_the_claim_back)
    with pytest.raises(OperationalError):
        handlers.run_stage(run_id, "s0")
    monkeypatch.undo()
    assert stages.next_waiting(agent["agentUuid"]) == [(run_id, "s0")]  # in line still
    assert selection.live_slots(agent["agentUuid"]) == 0
    assert not any(key[0] == agent["agentUuid"] for key in selection._held_slots)


def test_a_slot_comes_back_when_recording_the_agent_fails(
    user: Api, sent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The slot is reserved, then the database fails as the agent is recorded on the stage:
    the message goes back for redelivery and the slot at once (not at its lease's end, the
    stage's whole timeout later)."""
    from sqlalchemy.exc import OperationalError

    from chalicelib.core.api import parse_run_ref
    from chalicelib.engine import handlers, stages

    capability = unique_capability("assign-fails")
    agent = register_agent(user, capability, maxConcurrentTasks=2)
    run_id = parse_run_ref(submit(user, capability))

    def no_database(*args: Any, **kwargs: Any) -> None:
        raise OperationalError("assign", {}, Exception("connection lost"))

    monkeypatch.setattr(stages, "assign_agent", no_database)
    with pytest.raises(OperationalError):
        handlers.run_stage(run_id, "s0")
    assert selection.live_slots(agent["agentUuid"]) == 0
    monkeypatch.undo()
    assert handlers.run_stage(run_id, "s0") == "completed"  # the redelivery


def test_a_stage_made_to_wait_just_after_a_release_is_not_left_waiting(
    user: Api, sent: Any
) -> None:
    """The slot came free after the completion (or submission) found the agents full but
    before the stage was stored waiting, so the release found no one: the look once more
    that follows the parking starts it (a worker's, in the slot it takes) or wakes it (the
    API's)."""
    from chalicelib.engine import handlers
    from chalicelib.workflows import runs

    capability = unique_capability("late-look")
    agent, choice, run_id = _parked_behind_a_full_agent(user, capability)
    selection.release(choice)  # the call ended, and its release found no one waiting
    group = handlers.TaskGroup()
    owner = uuid.UUID(agent["ownerUserUuid"])
    handlers._look_again(run_id, ["s0"], capability, owner, handlers.Invocation(group=group))
    group.wait()
    assert _stage_status(user, f"wfr-{run_id}") == "completed"
    assert selection.live_slots(agent["agentUuid"]) == 0  # its slot given back after the call

    capability = unique_capability("late-look-api")
    _, choice, run_id = _parked_behind_a_full_agent(user, capability)
    selection.release(choice)
    runs._look_again(run_id, "s0", capability, owner)
    assert _stage_status(user, f"wfr-{run_id}") == "queued"
    assert (run_id, "s0") in sent.sent


def _submit_with_input(client: Api, capability: str, template: Any) -> uuid.UUID:
    """A one-stage run whose stage input is `template`, with an empty workflow input."""
    from chalicelib.core.api import parse_run_ref

    stage = {"id": "s0", "name": "S0", "agentCapability": capability, "input": template}
    body = {"workflow": {"name": "bp", "stages": [stage]}, "input": {}}
    response = client.post("/workflows/execute", body)
    assert response.status_code == 202, response.text
    return parse_run_ref(response.json()["data"]["workflowRunId"])


def test_a_slot_handed_to_a_stage_whose_input_cannot_resolve_goes_to_the_next_in_line(
    user: Api, sent: Any
) -> None:
    """A call returns and hands its slot to the first stage waiting behind the full agent;
    that stage's input names a workflow input field that is not there, so it fails without
    any call. The slot used to stay taken (renewed to the stage's whole timeout while the
    worker held anything else): the agent looked full, idle, and the stage behind waited.
    Now the slot comes back at once and the next stage waiting for it starts in it."""
    from chalicelib.core.api import parse_run_ref
    from chalicelib.engine import handlers, stages

    capability = unique_capability("handed-bad-input")
    agent = register_agent(user, capability, maxConcurrentTasks=1)
    slot = selection._reserve(agent["agentUuid"], 1, time.time() + 60)
    assert isinstance(slot, str)  # a call in flight holds the one slot
    [listed] = selection.eligible(capability, uuid.UUID(agent["ownerUserUuid"]))
    call = selection.AgentChoice(
        agent["agentUuid"], agent["agentId"], listed["endpoint"], listed["tokenEncrypted"], 1, slot
    )
    bad = _submit_with_input(user, capability, {"x": "${workflow.input.missing}"})
    good = parse_run_ref(submit(user, capability))
    assert stages.next_waiting(agent["agentUuid"]) == [(bad, "s0"), (good, "s0")]
    group = handlers.TaskGroup()
    handlers._free_slot(call, handlers.Invocation(group=group), True, time.monotonic())
    group.wait()
    failed = user.get(f"/workflows/wfr-{bad}").json()["data"]
    assert failed["status"] == "failed", failed
    assert "Unknown reference" in str(failed["stages"][0]["errorMessage"])
    assert _stage_status(user, f"wfr-{good}") == "completed"
    assert selection.live_slots(agent["agentUuid"]) == 0
    assert not any(key[0] == agent["agentUuid"] for key in selection._held_slots)


def test_after_a_run_whose_input_cannot_resolve_took_a_handed_slot_the_agent_serves_the_next(
    user: Api, poller: Any, timed: list[TimedAgent]
) -> None:
    """Through the queue: a one-slot agent's call in flight, a run whose input cannot
    resolve waiting behind it. The call ends and hands its slot to that run, which fails
    without calling; a run submitted next used to find the idle agent full and wait."""
    slow = timed_agent(timed, seconds=1.5)
    capability = unique_capability("handed-bad-input-e2e")
    agent = register_agent(user, capability, endpoint=slow.url, maxConcurrentTasks=1)
    first = submit(user, capability)
    wait_until(lambda: len(slow.calls) == 1, timeout=10)
    bad = _submit_with_input(user, capability, "${workflow.input.nope}")
    assert wait_for_run(user, first)["status"] == "completed"
    assert wait_for_run(user, f"wfr-{bad}")["status"] == "failed"
    wait_until(lambda: selection.live_slots(agent["agentUuid"]) == 0, timeout=2)
    third = submit(user, capability)
    assert wait_for_run(user, third, timeout=10)["status"] == "completed"
    assert len(slow.calls) == 2 and slow.peak == 1


# ------------------------------------------------------------------ an agent that may take work


# Well within the sweeper's wake (MAOF_SWEEP_QUEUED_AFTER_SECONDS, 10 s, plus its interval)
# and before the busy agent's call ends; the test poller runs no sweeper anyway.
AT_ONCE_SECONDS = 3.0


@pytest.mark.parametrize("busy_agent", ["full", "deleted"])
def test_registering_an_agent_starts_the_stages_waiting_for_its_capability_at_once(
    user: Api, poller: Any, timed: list[TimedAgent], busy_agent: str
) -> None:
    """Every agent with the capability was full (or the only one, full, then deleted), so
    stages wait; a new agent with it is registered. They used to wait for the sweeper's
    look (about 11 s) while the new agent idled: now the registration wakes as many as it
    has slots, and they run on it at once."""
    slow = timed_agent(timed, seconds=AT_ONCE_SECONDS + 3)
    capability = unique_capability("newcomer")
    busy = register_agent(user, capability, endpoint=slow.url, maxConcurrentTasks=1)
    submit(user, capability)
    wait_until(lambda: len(slow.calls) == 1, timeout=10)
    waiting = [submit(user, capability) for _ in range(2)]
    assert [_stage_status(user, ref) for ref in waiting] == ["waiting", "waiting"]
    if busy_agent == "deleted":
        assert user.delete(f"/agents/{busy['agentUuid']}").status_code == 200
    newcomer = register_agent(user, capability, maxConcurrentTasks=2)
    # Woken by the registration itself (sent to a worker: queued), not left waiting for a
    # look; how soon a worker takes them depends on the queue (other tests' messages).
    assert "waiting" not in [_stage_status(user, ref) for ref in waiting]
    for ref in waiting:
        run = wait_for_run(user, ref)
        assert run["status"] == "completed", run
        assert run["stages"][0]["agentId"] == newcomer["agentId"]
    assert len(slow.calls) == 1


def test_an_agent_back_from_offline_starts_the_stages_waiting_for_it_at_once(
    user: Api, poller: Any, timed: list[TimedAgent], agents: list[Any]
) -> None:
    """The other agent with the capability was offline while the stages began to wait; a
    health check finds it back: the stages waiting for it start on it at once."""
    from tests.support.agents import start_agent

    slow = timed_agent(timed, seconds=AT_ONCE_SECONDS + 3)
    capability = unique_capability("revived")
    register_agent(user, capability, endpoint=slow.url, maxConcurrentTasks=1)
    down = start_agent(agents)
    down.health_script.append((0.0, 503, b"{}"))  # its probe at registration: offline
    revived = register_agent(user, capability, endpoint=down.url, maxConcurrentTasks=1)
    assert revived["status"] == "offline"
    submit(user, capability)
    wait_until(lambda: len(slow.calls) == 1, timeout=10)
    waiting = submit(user, capability)
    assert _stage_status(user, waiting) == "waiting"
    checked = user.post(f"/agents/{revived['agentUuid']}/health-check")
    assert checked.json()["data"]["status"] == "online", checked.text
    assert _stage_status(user, waiting) != "waiting"  # woken by the check itself
    run = wait_for_run(user, waiting)
    assert run["status"] == "completed", run
    assert run["stages"][0]["agentId"] == revived["agentId"]


def test_sharing_an_agent_starts_the_stages_of_others_waiting_for_it_at_once(
    user: Api, admin: Api, poller: Any, timed: list[TimedAgent]
) -> None:
    """The user's own agent is full, so their stage waits; an admin shares an idle agent
    with the capability: it used to idle until the sweeper's look, as a new agent did."""
    slow = timed_agent(timed, seconds=AT_ONCE_SECONDS + 3)
    capability = unique_capability("shared-now")
    register_agent(user, capability, endpoint=slow.url, maxConcurrentTasks=1)
    idle = register_agent(admin, capability, maxConcurrentTasks=1)
    submit(user, capability)
    wait_until(lambda: len(slow.calls) == 1, timeout=10)
    waiting = submit(user, capability)
    assert _stage_status(user, waiting) == "waiting"
    shared = admin.request("PATCH", f"/agents/{idle['agentUuid']}", json={"visibility": "shared"})
    assert shared.status_code == 200, shared.text
    # Woken by the request itself (sent to a worker: queued), not left waiting for a look;
    # how soon a worker takes it depends on the queue (other tests' messages may be ahead).
    assert _stage_status(user, waiting) != "waiting"
    assert wait_for_run(user, waiting)["status"] == "completed"


def test_an_agent_that_may_take_work_wakes_no_more_stages_than_it_has_slots_free(
    user: Api, sent: Any
) -> None:
    from chalicelib.core.api import parse_run_ref
    from chalicelib.engine import handlers

    capability = unique_capability("wake-count")
    agent = register_agent(user, capability, maxConcurrentTasks=1)
    slot = selection._reserve(agent["agentUuid"], 1, time.time() + 60)
    assert isinstance(slot, str)
    runs = [parse_run_ref(submit(user, capability)) for _ in range(3)]
    assert [_stage_status(user, f"wfr-{r}") for r in runs] == ["waiting"] * 3
    # Two slots, one of them taken: one stage woken, the first in line.
    assert handlers.wake_waiting_for(uuid.UUID(agent["agentUuid"]), 2) == 1
    assert [_stage_status(user, f"wfr-{r}") for r in runs] == ["queued", "waiting", "waiting"]
    assert sent.sent == [(runs[0], "s0")]
    assert selection.may_be_waited_for(
        selection.AgentChoice(agent["agentUuid"], "", "", "", 1)
    )  # the releases of its calls hand its slots to those still waiting


def test_a_failure_to_wake_the_waiting_stages_fails_no_registration(
    user: Api, sent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chalicelib.engine import handlers, stages

    def no_database(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the database went away")

    monkeypatch.setattr(stages, "next_waiting", no_database)
    agent = register_agent(user, unique_capability("wake-fails"))
    assert agent["status"] == "online"
    assert handlers.wake_waiting_for(uuid.UUID(agent["agentUuid"]), 5) == 0
