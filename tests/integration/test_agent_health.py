"""Health checks of agents under races and slow agents: the newest probe's result stands,
a deleted agent's check is a 404 and writes nothing, a probe ends by its timeout however
long the agent's name took to look up, and reads the agent's final answer."""

from __future__ import annotations

import concurrent.futures
import math
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import select

from chalicelib.agents import health, network
from chalicelib.config import get_settings, reset_settings
from chalicelib.db import session_scope
from chalicelib.db.models import Agent
from tests.integration.conftest import register_agent, unique_capability, wait_until
from tests.support.agents import ScriptedAgent
from tests.support.callbacks import TricklingServer
from tests.support.raw_server import answering

pytestmark = pytest.mark.integration


@pytest.fixture
def hserver() -> Iterator[ScriptedAgent]:
    agent = ScriptedAgent().start()
    yield agent
    agent.stop()


def probes(agent: ScriptedAgent) -> int:
    return sum(1 for seen in agent.seen if seen.method == "GET")


HEALTHY = b'{"status": "healthy"}'


def test_the_newest_probe_stands_when_an_older_one_answers_after_it(user, hserver):
    """A scheduled check and the owner's check of one agent at once: the probe that began
    first but answered last (slowly, while the agent was up) overwrote the newer probe's
    'offline', and the agent stayed routed to until the next check."""
    agent = register_agent(user, unique_capability("race"), endpoint=hserver.url)
    hserver.health_script.extend([(1.5, 200, HEALTHY), (0.0, 503, b"{}")])
    with session_scope() as session:
        row = session.scalar(select(Agent).where(Agent.id == agent["agentUuid"]))
        target = (row.id, row.endpoint)
    gets_before = probes(hserver)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        scheduled = pool.submit(health.check, [target])
        wait_until(lambda: probes(hserver) > gets_before, timeout=5)  # its probe began
        manual = user.post(f"/agents/{agent['agentUuid']}/health-check").json()["data"]
        scheduled.result()
    assert manual["status"] == "offline"
    assert user.get(f"/agents/{agent['agentUuid']}").json()["data"]["status"] == "offline"


def test_a_check_of_an_agent_deleted_meanwhile_is_a_404_and_writes_nothing(user, hserver):
    agent = register_agent(user, unique_capability("del"), endpoint=hserver.url)
    hserver.health_script.append((1.5, 200, HEALTHY))
    gets_before = probes(hserver)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        checking = pool.submit(user.post, f"/agents/{agent['agentUuid']}/health-check")
        wait_until(lambda: probes(hserver) > gets_before, timeout=5)
        assert user.delete(f"/agents/{agent['agentUuid']}").status_code == 200
        checked = checking.result()
    assert checked.status_code == 404, checked.text
    with session_scope() as session:
        row = session.scalar(select(Agent).where(Agent.id == agent["agentUuid"]))
    assert row is not None and row.deleted_at is not None
    assert row.last_health_check is not None and row.last_health_check < row.deleted_at


def test_a_probe_ends_by_its_timeout_however_slow_the_name_lookup(monkeypatch):
    """The lookup took part of the time and the connection was still given all of it: a
    slow name server and a paced TLS handshake held a 2 s probe 3.5 s."""

    def slow_lookup(hostname: str, port: int) -> list[str]:
        time.sleep(1.5)  # the owner's name server answers slowly, within the deadline
        return ["127.0.0.1"]

    monkeypatch.setattr(network, "resolve_host", slow_lookup)
    agent = TricklingServer("tls")
    port = agent.listener.getsockname()[1]
    started = time.monotonic()
    try:
        status = health.probe(f"https://slow-agent.test:{port}/agent")
    finally:
        agent.stop.set()
    took = time.monotonic() - started
    assert status == "offline"
    allowed = get_settings().agent_health_timeout_ms / 1000
    assert took < allowed + 0.5, f"the probe took {took:.2f} s, its timeout is {allowed} s"


def test_hung_lookups_of_one_users_agents_leave_another_users_agent_as_it_was(
    api, hserver, monkeypatch
):
    """One user's agents on names whose name server never answers: each probe gives its
    lookup up at its deadline, but the lookup holds its thread until the system resolver
    gives up. With every lookup thread so held, the next agent in the same check, another
    user's healthy one, got no lookup before its deadline and was recorded offline. It is
    now not checked: its status and lastHealthCheck stay as they were."""
    other = api.as_new_user()
    endpoint = hserver.url.replace("127.0.0.1", "localhost")  # a name, as agents have
    victim = register_agent(other, unique_capability("victim"), endpoint=endpoint)
    assert victim["status"] == "online"
    real_resolve = network.resolve_host
    released = threading.Event()

    def resolve(hostname: str, port: int) -> list[str]:
        if hostname.endswith(".blackhole.test"):
            released.wait(20)  # the other user's name server never answers
            return ["127.0.0.1"]
        return real_resolve(hostname, port)

    monkeypatch.setattr(network, "resolve_host", resolve)
    monkeypatch.setenv("MAOF_AGENT_HEALTH_TIMEOUT_MS", "500")
    reset_settings()
    hung = [
        (uuid.uuid4(), f"http://a{index}.blackhole.test/agent")
        for index in range(network.LOOKUP_THREADS)
    ]
    try:
        health.check([*hung, (uuid.UUID(victim["agentUuid"]), endpoint)])
    finally:
        released.set()
        monkeypatch.delenv("MAOF_AGENT_HEALTH_TIMEOUT_MS")
        reset_settings()
        wait_until(lambda: not network._lookups, timeout=5)
    after = other.get(f"/agents/{victim['agentUuid']}").json()["data"]
    assert (after["status"], after["lastHealthCheck"]) == ("online", victim["lastHealthCheck"])


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_the_scheduled_check_starts_only_the_probes_that_end_within_its_budget(user, monkeypatch):
    """A chunk's probes run PROBES_AT_ONCE at a time, a wave ending by the probe timeout.
    The first chunk was started whole whatever the budget: 4 waves of 10 s past a 25 s one
    (at the 30 s timeout once allowed, 120 s: the function was killed at 60 s before it
    recorded anything, and the same agents came first again next time). Each chunk is now
    as many waves as fit in what is left."""
    for _ in range(2 * health.PROBES_AT_ONCE + 1):  # more than two waves of live agents
        register_agent(user, unique_capability("budget"))
    monkeypatch.setenv("MAOF_AGENT_HEALTH_TIMEOUT_MS", "10000")
    reset_settings()
    clock = FakeClock()
    monkeypatch.setattr(health, "time", SimpleNamespace(monotonic=clock.monotonic))
    chunks: list[int] = []

    def every_probe_to_its_timeout(targets: Any, available: Any = None) -> list[Any]:
        chunks.append(len(targets))
        clock.now += math.ceil(len(targets) / health.PROBES_AT_ONCE) * 10
        return [SimpleNamespace(status="offline") for _ in targets]

    monkeypatch.setattr(health, "check", every_probe_to_its_timeout)
    try:
        result = health.scheduled_check(budget_seconds=25)
        assert clock.now - 1000 <= 25, f"chunks {chunks} took {clock.now - 1000} s"
        assert chunks == [2 * health.PROBES_AT_ONCE], chunks
        assert result["checked"] == 2 * health.PROBES_AT_ONCE
        chunks.clear()
        started = clock.now
        health.scheduled_check()  # the longest timeout allowed, the function's budget
        assert chunks and clock.now - started <= health.CHECK_BUDGET_SECONDS, chunks
    finally:
        monkeypatch.delenv("MAOF_AGENT_HEALTH_TIMEOUT_MS")
        reset_settings()


def test_a_check_tells_of_the_agents_back_from_offline_and_of_no_other(user, hserver):
    """What the scheduled check and the manual one hand to the engine, which wakes the
    stages waiting for such an agent: only a change from offline to a status routed to."""
    hserver.health_script.extend([(0.0, 503, b"{}"), (0.0, 200, HEALTHY)])
    down = register_agent(user, unique_capability("back"), endpoint=hserver.url)
    assert down["status"] == "offline"
    up = register_agent(user, unique_capability("up"), maxConcurrentTasks=3)
    with session_scope() as session:
        targets = [
            (row.id, row.endpoint)
            for row in session.scalars(
                select(Agent).where(Agent.id.in_([down["agentUuid"], up["agentUuid"]]))
            )
        ]
    told: list[tuple[object, int]] = []
    health.check(targets, lambda agent_uuid, slots: told.append((str(agent_uuid), slots)))
    assert told == [(down["agentUuid"], 5)]
    health.check(targets, lambda agent_uuid, slots: told.append((str(agent_uuid), slots)))
    assert told == [(down["agentUuid"], 5)]  # online already: nothing new


def test_a_probe_reads_past_interim_1xx_answers_to_the_final_one():
    """A 103 Early Hints before the agent's 200 was taken for the answer: 'degraded'."""
    listener, _ = answering(
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(HEALTHY) + HEALTHY
    )
    try:
        status = health.probe(f"http://127.0.0.1:{listener.getsockname()[1]}/agent")
    finally:
        listener.close()
    assert status == "online"


@pytest.mark.parametrize(
    ("padding", "status"), [(4096 - len(HEALTHY), "online"), (8000, "degraded")]
)
def test_a_healthy_body_over_4_kib_is_degraded(hserver, padding, status):
    """docs/protocol.md: online takes a body within 4 KiB; its first 4097 bytes were
    parsed, and a longer body starting with {"status": "healthy"} read as online."""
    hserver.health_script.append((0.0, 200, HEALTHY + b" " * padding))
    assert health.probe(hserver.url) == status


def test_of_two_checks_from_hosts_whose_clocks_differ_the_later_one_stands(
    user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scheduled check ran on a host whose clock was 5 s ahead (online); the owner's
    check a moment later on another host (offline) was taken for the older and dropped:
    "the newest result stands" compared two hosts' clocks. They are ordered by the
    database's."""
    agent = register_agent(user, unique_capability("hc-clocks"))
    agent_id = uuid.UUID(agent["agentUuid"])

    class Ahead:
        @staticmethod
        def now(tz: Any = None) -> datetime:
            return datetime.now(tz) + timedelta(seconds=5)

    monkeypatch.setattr(health, "probe", lambda endpoint: "online")
    monkeypatch.setattr(health, "datetime", Ahead)  # the schedule's host
    health.check([(agent_id, agent["endpoint"])])
    monkeypatch.setattr(health, "probe", lambda endpoint: "offline")
    monkeypatch.setattr(health, "datetime", datetime)  # the owner's request, later
    answered = health.check([(agent_id, agent["endpoint"])])
    assert [a.status for a in answered] == ["offline"]
    with session_scope() as session:
        assert session.get(Agent, agent_id).status == "offline"  # type: ignore[union-attr]
