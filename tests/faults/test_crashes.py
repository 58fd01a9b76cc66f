"""A worker that dies mid-stage does not strand the run: the stage's message comes back
(same attempt, same Idempotency-Key), it completes once and its effects happen once; an
error after the agent answered is recovered, or, when it keeps happening, fails the stage
after its retries instead of redelivering forever."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chalicelib.aws import aws_client
from chalicelib.config import get_settings
from chalicelib.engine import stages
from chalicelib.engine.queue import StageMessage
from chalicelib.workflows import runs
from devstack.stack import PROJECT_DIR, ensure_resources
from tests.faults.conftest import (
    assert_ended_for_good,
    audit,
    call_log,
    executes_per_stage,
    pipeline,
    submit,
    wait_terminal,
)
from tests.integration.conftest import register_agent, unique_capability, wait_until
from tests.support.agents import ok, sleep, start_agent

# "The system heals itself within seconds": 30 s, plus 15 s for a loaded two-core machine.
RECOVERY_SECONDS = 45.0


class PollerProcess:
    """`python -m devstack.poller` as `make dev` runs it (the app's handlers, the
    sweeper and health checks on their default schedules), on a queue of its own."""

    def __init__(self, queue_name: str, log: Path, **env: str) -> None:
        self.env = {**os.environ, "MAOF_STAGE_QUEUE_NAME": queue_name, **env}
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> PollerProcess:
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "devstack.poller"],
                cwd=PROJECT_DIR,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait_until(lambda: b"poller: draining" in self.log.read_bytes()[offset:], timeout=30)
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup, no release, no delete; what a crashed Lambda leaves."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@pytest.fixture
def crash_queue() -> Iterator[str]:
    """A stage queue only the poller subprocesses drain, made as `make dev` makes its queue."""
    name = f"maof-test-crash-{uuid.uuid4().hex[:8]}"
    ensure_resources(get_settings().model_copy(update={"stage_queue_name": name}))
    yield name
    sqs = aws_client("sqs")
    for queue in (name, f"{name}-dlq"):
        sqs.delete_queue(QueueUrl=sqs.get_queue_url(QueueName=queue)["QueueUrl"])


def sender_to(queue_name: str) -> Any:
    """A stand-in for send_stage_messages that sends to `queue_name`."""
    sqs = aws_client("sqs")
    queue_url = sqs.get_queue_url(QueueName=queue_name)["QueueUrl"]

    def send(run_id: uuid.UUID, stage_ids: list[str], **_: Any) -> None:
        entries = [
            {"Id": str(i), "MessageBody": StageMessage(run_id, s).body()}
            for i, s in enumerate(stage_ids)
        ]
        sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)

    return send


def helpers_of(pid: int) -> list[int]:
    """The live helper processes a poller started (`--helper-of PID`)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if (
            b"--helper-of" in cmdline
            and cmdline[cmdline.index(b"--helper-of") + 1] == str(pid).encode()
            and state != "Z"
        ):
            found.append(int(entry.name))
    return found


@pytest.fixture
def pollers(crash_queue: str, tmp_path: Path) -> Iterator[list[PollerProcess]]:
    started: list[PollerProcess] = []
    yield started
    for poller in started:
        poller.stop()


def test_a_worker_killed_mid_call_is_replaced_and_the_stage_completes_once(
    user, agents, crash_queue, pollers, tmp_path, monkeypatch
):
    agent = start_agent(agents, default=ok({"done": True}))
    agent.script.append(sleep(8, {"too": "late"}))  # the first call outlives its worker
    capability = unique_capability("killed")
    register_agent(user, capability, endpoint=agent.url)
    monkeypatch.setattr(runs, "send_stage_messages", sender_to(crash_queue))
    log = tmp_path / "poller.log"
    first = PollerProcess(crash_queue, log).start()
    pollers.append(first)
    run_id = submit(user, pipeline(capability, "a", "b", config={"timeoutMs": 10_000}))
    wait_until(lambda: len(agent.calls) == 1, timeout=30)
    first.kill()
    killed_at = time.monotonic()
    pollers.append(PollerProcess(crash_queue, log).start())
    try:
        run = wait_terminal(user, run_id, RECOVERY_SECONDS, agent)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\npoller log:\n{pollers[-1].tail()}") from None
    recovered_in = time.monotonic() - killed_at
    assert run["status"] == "completed", run
    assert recovered_in <= RECOVERY_SECONDS
    # A redelivery of the same attempt: the agent sees the same key twice, then stage b once.
    assert agent.keys() == [f"{run_id}:a:1", f"{run_id}:a:1", f"{run_id}:b:1"], call_log(agent)
    assert executes_per_stage(audit(user, run_id)) == {"a": 1, "b": 1}
    assert run["stages"][0]["output"] == {"done": True}
    assert_ended_for_good(user, run_id, agent)


def test_the_poller_runs_in_several_processes_that_stop_and_die_with_it(
    user, agents, crash_queue, pollers, tmp_path, monkeypatch
):
    agent = start_agent(agents, default=ok({"done": True}))
    capability = unique_capability("helpers")
    register_agent(user, capability, endpoint=agent.url)
    monkeypatch.setattr(runs, "send_stage_messages", sender_to(crash_queue))
    log = tmp_path / "poller.log"
    first = PollerProcess(crash_queue, log, MAOF_POLLER_PROCESSES="2").start()
    pollers.append(first)
    assert first.process is not None
    assert "up to 16 executions" in first.tail() and "in 2 process(es)" in first.tail()
    [helper] = wait_until(lambda: helpers_of(first.process.pid), timeout=10)
    run_ids = [submit(user, pipeline(capability, "a", "b")) for _ in range(6)]
    for run_id in run_ids:
        assert wait_terminal(user, run_id, DEADLINE, agent)["status"] == "completed"
    first.kill()  # SIGKILL: its helper goes too, at once
    wait_until(lambda: helper not in helpers_of(first.process.pid), timeout=5)
    second = PollerProcess(crash_queue, log, MAOF_POLLER_PROCESSES="2").start()
    pollers.append(second)
    assert second.process is not None
    [helper] = wait_until(lambda: helpers_of(second.process.pid), timeout=10)
    os.kill(helper, signal.SIGKILL)  # a helper that dies takes the poller down (make dev sees it)
    assert second.process.wait(30) == 1
    third = PollerProcess(crash_queue, log, MAOF_POLLER_PROCESSES="2").start()
    pollers.append(third)
    assert third.process is not None
    wait_until(lambda: helpers_of(third.process.pid), timeout=10)
    third.process.terminate()  # SIGTERM (make dev's Ctrl-C): both stop, cleanly
    assert third.process.wait(30) == 0
    wait_until(lambda: not helpers_of(third.process.pid), timeout=5)


class InjectedFault(Exception):
    """Stands in for anything that breaks after the agent answered (the database
    connection lost, a bug in storing the output)."""


FAST = {"retries": 1, "backoffMs": 0, "timeoutMs": 5000}
DEADLINE = 30.0


def test_an_error_after_the_agent_answered_is_recovered_and_the_stage_completes_once(
    user, engine_poller, agents, monkeypatch
):
    agent = start_agent(agents, default=ok({"stored": "eventually"}))
    capability = unique_capability("inject-once")
    register_agent(user, capability, endpoint=agent.url)
    real_complete = stages.complete_stage
    raised: list[str] = []

    def fails_once(stage: stages.ClaimedStage, *args: Any, **kwargs: Any) -> list[str]:
        if not raised:
            raised.append(stage.stage_id)
            raise InjectedFault("injected after the agent answered")
        return real_complete(stage, *args, **kwargs)

    monkeypatch.setattr(stages, "complete_stage", fails_once)
    run_id = submit(user, pipeline(capability, "a", "b", config=FAST))
    run = wait_terminal(user, run_id, DEADLINE, agent)
    assert raised == ["a"]
    assert run["status"] == "completed", run
    assert executes_per_stage(audit(user, run_id)) == {"a": 1, "b": 1}
    keys_a = [key for key in agent.keys() if key.startswith(f"{run_id}:a:")]
    # Stage a's answer was lost with the error: asked again, as the same attempt.
    assert 1 <= len(keys_a) <= 2 and set(keys_a) == {f"{run_id}:a:1"}, call_log(agent)
    assert agent.keys().count(f"{run_id}:b:1") == 1
    assert_ended_for_good(user, run_id, agent)


def test_an_error_that_always_follows_the_answer_fails_the_stage_after_its_retries(
    user, engine_poller, agents, monkeypatch
):
    agent = start_agent(agents, default=ok({"never": "stored"}))
    capability = unique_capability("inject-always")
    register_agent(user, capability, endpoint=agent.url)
    raised: list[str] = []

    def always_fails(stage: stages.ClaimedStage, *args: Any, **kwargs: Any) -> list[str]:
        raised.append(stage.stage_id)
        raise InjectedFault("injected after the agent answered")

    monkeypatch.setattr(stages, "complete_stage", always_fails)
    run_id = submit(user, pipeline(capability, "a", "b", config=FAST))
    run = wait_terminal(user, run_id, DEADLINE, agent)
    assert run["status"] == "failed", run
    stage = run["stages"][0]
    assert stage["status"] == "failed", stage
    assert (
        "InjectedFault" in stage["errorMessage"]
        or "injected after the agent answered" in stage["errorMessage"]
    ), stage["errorMessage"]
    assert run["stages"][1]["status"] == "skipped"
    assert executes_per_stage(audit(user, run_id)) == {}
    # Attempts are bounded by the stage's retries; redeliveries of one attempt by a small
    # number, never by time alone.
    assert len(set(agent.keys())) <= FAST["retries"] + 1, call_log(agent)
    assert len(agent.calls) <= 10, call_log(agent)
    assert_ended_for_good(user, run_id, agent)
