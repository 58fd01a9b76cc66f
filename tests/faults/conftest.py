"""Fault-suite fixtures: the integration fixtures (the real stack, the API over HTTP), the
engine's poller as `make dev` runs it (with the sweeper and health checks on their default
schedules), scripted agents, and what every fault test checks about a run once it ended.

The integration fixtures are imported, so pytest makes a second instance of each for this
folder (a fresh test database included): fault tests therefore run after the unit and
integration tests, and before the browser tests, which do the same.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import *  # noqa: F403 (stack, api_url, api, user, admin, …)
from tests.integration.conftest import Api, wait_until
from tests.support.agents import ScriptedAgent

HERE = Path(__file__).parent
BROWSER = HERE.parent / "browser"
TERMINAL = ("completed", "failed", "cancelled")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def under(folder: Path, item: pytest.Item) -> bool:
        return folder in Path(str(item.path)).parents

    faults = [item for item in items if under(HERE, item)]
    if faults:
        browser = [item for item in items if under(BROWSER, item)]
        others = [item for item in items if item not in faults and item not in browser]
        items[:] = others + faults + browser


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from tests.faults import chaos

    if chaos.RESULTS:
        terminalreporter.section("chaos: every accepted run ends")
        for line in chaos.table(chaos.RESULTS).splitlines():
            terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def engine_poller(stack: None) -> Iterator[Any]:
    """The poller `make dev` runs (devstack.poller.from_app): 4 workers, the sweeper
    and the agent health checks on their configured (default) schedules. Module-scoped, so
    nothing of it runs on behind the module's tests."""
    from devstack.poller import from_app

    running = from_app(concurrency=4).start()
    yield running
    running.stop()


def pipeline(capability: str, *stage_ids: str, config: dict[str, Any] | None = None) -> list[Any]:
    """A linear pipeline: each stage depends on the one before."""
    return [
        {
            "id": stage_id,
            "name": stage_id,
            "agentCapability": capability,
            "dependencies": [stage_ids[i - 1]] if i else [],
            **({"config": config} if config else {}),
        }
        for i, stage_id in enumerate(stage_ids)
    ]


def submit(client: Api, stages: list[dict[str, Any]], name: str = "faults") -> str:
    response = client.post(
        "/workflows/execute",
        {"workflow": {"name": name, "stages": stages}, "input": {"text": "hello"}},
    )
    assert response.status_code == 202, response.text
    return str(response.json()["data"]["workflowRunId"])


def run_detail(client: Api, run_id: str) -> dict[str, Any]:
    return dict(client.get(f"/workflows/{run_id}").json()["data"])


def wait_terminal(
    client: Api, run_id: str, timeout: float, agent: ScriptedAgent | None = None
) -> dict[str, Any]:
    """The run once it is completed, failed or cancelled; fails after `timeout` seconds
    saying where the run stands and what its agent saw."""
    try:
        return dict(
            wait_until(
                lambda: (run := run_detail(client, run_id))["status"] in TERMINAL and run,
                timeout=timeout,
                interval=0.1,
            )
        )
    except AssertionError:
        run = run_detail(client, run_id)
        stages = [
            (s["stageId"], s["status"], s["attempt"], s["errorMessage"]) for s in run["stages"]
        ]
        seen = ""
        if agent is not None:
            seen = f"; agent calls (key, outcome, seconds): {call_log(agent)}"
        raise AssertionError(
            f"run {run_id} is still {run['status']} after {timeout}s (stages: {stages}){seen}"
        ) from None


def call_log(agent: ScriptedAgent) -> list[tuple[str, str, float | None]]:
    return [
        (c.headers.get("Idempotency-Key", ""), c.outcome, c.seconds and round(c.seconds, 2))
        for c in agent.calls
    ]


def audit(client: Api, run_id: str) -> list[dict[str, Any]]:
    body = client.get(f"/workflows/{run_id}/audit").json()["data"]
    assert body["chain"]["valid"] is True, body["chain"]
    return list(body["logs"])


def executes_per_stage(entries: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in entries:
        if entry["action"] == "execute":
            counts[entry["stageId"]] = counts.get(entry["stageId"], 0) + 1
    return counts


def stage_message(run_id: str, stage_id: str) -> dict[str, Any]:
    """An SQS record for the stage, as Lambda would deliver it."""
    raw_id = run_id.removeprefix("wfr-")
    return {
        "messageId": str(uuid.uuid4()),
        "receiptHandle": "fault-suite",
        "body": json.dumps({"runId": raw_id, "stageId": stage_id}),
    }


def assert_ended_for_good(client: Api, run_id: str, *agents_: ScriptedAgent) -> None:
    """Once a run ended, nothing brings its stages back: a late redelivery of every stage's
    message and a sweep neither call an agent nor add to its audit trail, and no stage has
    two `execute` entries."""
    from chalicelib.engine import handlers

    run = run_detail(client, run_id)
    assert run["status"] in TERMINAL, run
    entries = audit(client, run_id)
    assert all(n == 1 for n in executes_per_stage(entries).values()), executes_per_stage(entries)
    calls = [len(agent.calls) for agent in agents_]
    for stage in run["stages"]:
        late = handlers.run_stage_batch([stage_message(run_id, stage["stageId"])])
        assert late == {"batchItemFailures": []}, (stage["stageId"], late)
    handlers.sweep_stalled_stages()
    assert [len(agent.calls) for agent in agents_] == calls, "an agent was called for an ended run"
    assert audit(client, run_id) == entries, "the audit trail of an ended run grew"
    assert run_detail(client, run_id)["status"] == run["status"]
