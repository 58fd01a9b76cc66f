"""What an operator sees: the EMF metric lines a stage writes (with the run's dimensions and
properties), the run and stage on the log lines of its work, and GET /stats."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from sqlalchemy import text

from chalicelib import db
from chalicelib.config import get_settings
from chalicelib.core.api import parse_run_ref
from chalicelib.engine import handlers, stages, sweeper
from chalicelib.logs import logger
from tests.integration.conftest import Api, register_agent, unique_capability, wait_for_run
from tests.integration.test_delivery import chain, record, stage_row, submit_direct
from tests.integration.test_engine_bounds import set_stage
from tests.support.agents import ScriptedAgent, error


@pytest.fixture(autouse=True)
def metrics_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")


def emf_lines(text: str) -> list[dict[str, Any]]:
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"_aws"' in line:
            found.append(json.loads(line))
    return found


def by_metric(lines: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    metrics: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        for directive in line["_aws"]["CloudWatchMetrics"]:
            assert directive["Namespace"] == "MAOF"
            for definition in directive["Metrics"]:
                metrics.setdefault(definition["Name"], []).append(line)
    return metrics


def test_a_stage_writes_its_metrics_with_the_runs_dimensions(
    user: Api, sent: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    capability = unique_capability("emf")
    register_agent(user, capability)
    run_id = submit_direct(user, chain(capability, "a"))
    capsys.readouterr()
    assert handlers.run_stage_batch([record(run_id, "a")]) == {"batchItemFailures": []}
    metrics = by_metric(emf_lines(capsys.readouterr().out))
    for name in ("StagesFinished", "StageDuration", "StageAttempts", "AgentLatency"):
        assert name in metrics, sorted(metrics)
    [finished] = metrics["StagesFinished"]
    assert finished["service"] == "maof"
    assert finished["Outcome"] == "completed"
    assert ["service", "Outcome"] in finished["_aws"]["CloudWatchMetrics"][0]["Dimensions"]
    assert (finished["runId"], finished["stageId"], finished["capability"]) == (
        str(run_id),
        "a",
        capability,
    )
    [duration] = metrics["StageDuration"]
    assert duration["StageDuration"][0] >= 0
    assert duration["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Unit"] == "Milliseconds"


def test_a_failing_stage_counts_its_failure_kind_and_its_log_lines_name_the_run(
    user: Api, sent: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    agent = ScriptedAgent(default=error("BROKEN", retryable=False)).start()
    try:
        capability = unique_capability("emf-fail")
        register_agent(user, capability, endpoint=agent.url)
        run_id = submit_direct(user, chain(capability, "a"))
        capsys.readouterr()
        handlers.run_stage_batch([record(run_id, "a")])
        out = capsys.readouterr().out
    finally:
        agent.stop()
    metrics = by_metric(emf_lines(out))
    [failure] = metrics["StageFailures"]
    assert failure["Kind"] == "agent-final"
    assert failure["code"] == "BROKEN"
    assert metrics["StagesFinished"][0]["Outcome"] == "failed"


class JsonLines(logging.Handler):
    """The log lines MAOF writes, formatted as its Powertools logger formats them."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logger.registered_formatter)
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


def test_log_lines_of_a_stages_work_carry_its_run_stage_and_agent(
    user: Api, sent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chalicelib.engine import stages

    capability = unique_capability("logs")
    agent = register_agent(user, capability)
    run_id = submit_direct(user, chain(capability, "a"))

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug after the agent answered")

    monkeypatch.setattr(stages, "complete_stage", broken)
    captured = JsonLines()
    logging.getLogger("maof").addHandler(captured)
    try:
        handlers.run_stage_batch([record(run_id, "a")])
    finally:
        logging.getLogger("maof").removeHandler(captured)
    [line] = [x for x in captured.lines if x["message"] == "stage raised; counted against it"]
    assert (line["runId"], line["stageId"], line["agentId"]) == (str(run_id), "a", agent["agentId"])


def test_stats_count_runs_stages_and_agents_of_the_last_hour(user: Api, poller: Any) -> None:
    capability = unique_capability("stats")
    agent = register_agent(user, capability)
    response = user.post(
        "/workflows/execute",
        {"workflow": {"name": "stats", "stages": chain(capability, "a", "b")}},
    )
    assert wait_for_run(user, response.json()["data"]["workflowRunId"])["status"] == "completed"
    data = user.get("/stats").json()["data"]
    assert data["runs"] == {"completed": 1}
    assert data["stages"] == {"completed": 2}
    [row] = data["agents"]
    assert (row["agentUuid"], row["agentId"], row["completed"], row["failed"]) == (
        agent["agentUuid"],
        agent["agentId"],
        2,
        0,
    )
    assert row["stageP95Ms"] >= row["stageP50Ms"] >= 0


def test_stats_count_a_run_live_now_that_was_created_before_the_window(
    user: Api, sent: Any
) -> None:
    """A run may last 24 h: one submitted two hours ago and running still was left out of
    runs and stages while its stage's completion counted under its agent."""
    capability = unique_capability("stats-long")
    agent = register_agent(user, capability)
    stages = chain(capability, "a", "b")
    response = user.post("/workflows/execute", {"workflow": {"name": "long", "stages": stages}})
    assert response.status_code == 202, response.text
    run_id = parse_run_ref(response.json()["data"]["workflowRunId"])
    with db.session_scope() as session:
        session.execute(
            text(
                "UPDATE workflow_runs SET status = 'in_progress', "
                "created_at = now() - interval '2 hours', started_at = now() - interval '2 hours'"
                " WHERE id = :id"
            ),
            {"id": run_id},
        )
        session.execute(
            text(
                "UPDATE stage_executions SET status = 'completed', agent_uuid = :agent, "
                "agent_id = :agent_id, started_at = now() - interval '10 minutes', "
                "completed_at = now() - interval '5 minutes' WHERE run_id = :id AND stage_id = 'a'"
            ),
            {"id": run_id, "agent": agent["agentUuid"], "agent_id": agent["agentId"]},
        )
    data = user.get("/stats").json()["data"]
    assert data["runs"] == {"in_progress": 1}, data
    assert data["stages"] == {"completed": 1, "pending": 1}, data
    [row] = data["agents"]
    assert (row["agentUuid"], row["completed"]) == (agent["agentUuid"], 1)


def test_stats_keep_apart_two_agents_of_one_agent_id(user: Api, poller: Any) -> None:
    """An agentId freed by a delete and registered again (or one of yours beside a shared
    one of the same id) names two agents: each gets its own row, not one merged."""
    capability = unique_capability("stats-twice")
    first = register_agent(user, capability)
    second = None
    for _ in range(2):
        response = user.post(
            "/workflows/execute",
            {"workflow": {"name": "stats", "stages": chain(capability, "a")}},
        )
        run = wait_for_run(user, response.json()["data"]["workflowRunId"])
        assert run["status"] == "completed", run
        if second is None:
            assert user.delete(f"/agents/{first['agentUuid']}").status_code == 200
            second = register_agent(user, capability, agentId=first["agentId"])
    rows = [
        r for r in user.get("/stats").json()["data"]["agents"] if r["agentId"] == first["agentId"]
    ]
    assert sorted((r["agentUuid"], r["completed"]) for r in rows) == sorted(
        [(first["agentUuid"], 1), (second["agentUuid"], 1)]
    )


def test_a_stage_that_waited_then_found_a_slot_at_its_last_look_is_counted_once(
    user: Api, sent: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its agents full at first, the stage parks, looks once more, finds a slot and runs
    under a new claim in the same worker: it finished once, and is counted once (the
    worker counted it for both claims before)."""
    capability = unique_capability("emf-wait")
    register_agent(user, capability)
    run_id = submit_direct(user, chain(capability, "a"))
    select = handlers._select_and_assign
    looks: list[str] = []

    def full_at_the_first_look(*args: Any, **kwargs: Any) -> Any:
        looks.append("look")
        if len(looks) == 1:
            raise handlers.AgentsBusy("every agent is busy")
        return select(*args, **kwargs)

    monkeypatch.setattr(handlers, "_select_and_assign", full_at_the_first_look)
    capsys.readouterr()
    assert handlers.run_stage(run_id, "a") == "completed"
    assert len(looks) == 2  # parked after the first, ran after the second
    metrics = by_metric(emf_lines(capsys.readouterr().out))
    assert [line["Outcome"] for line in metrics["StagesFinished"]] == ["completed"]
    assert len(metrics["StageDuration"]) == len(metrics["StageAttempts"]) == 1
    assert len(metrics["CapacityWaits"]) == 1


def test_the_oldest_queued_age_is_measured_before_the_sweep_re_sends_the_stage(
    user: Api,
    sent: Any,
    nothing_else_stalled: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Workers behind (a backlog): a stage due for 400 s is re-sent by the sweep, which
    restarts its wait. Measured after that, the age never passed the sweeper's grace, which
    is the OldestQueuedStage alarm's threshold: the alarm could not fire when it should."""
    capability = unique_capability("oldest")
    register_agent(user, capability)
    run_id = submit_direct(user, chain(capability, "a"))
    set_stage(run_id, "a", "queued_at = now() - interval '400 seconds'")
    monkeypatch.setattr(sweeper, "queue_backlog", lambda: 5000)
    monkeypatch.setattr(sweeper, "send_stage_messages", sent)
    capsys.readouterr()
    sweeper.sweep_once()
    metrics = by_metric(emf_lines(capsys.readouterr().out))
    assert (run_id, "a") in sent.sent  # re-sent
    [age] = metrics["OldestQueuedStageAge"]
    assert age["OldestQueuedStageAge"][0] >= 400, age


def test_a_stage_the_sweeper_fails_is_counted_as_finished_failed(
    user: Api,
    sent: Any,
    nothing_else_stalled: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A stage whose worker kept dying is failed by the sweeper: no StagesFinished was
    written, so the StageFailureRate alarm never saw the failures an operator most needs."""
    capability = unique_capability("swept-fail")
    register_agent(user, capability)
    run_id = submit_direct(user, chain(capability, "a"))
    assert stages.claim_stage(run_id, "a") is not None  # its worker then dies, again
    set_stage(
        run_id,
        "a",
        "lease_expires_at = now() - interval '1 second', lease_expiries = :n",
        n=get_settings().stage_max_lease_expiries,
    )
    monkeypatch.setattr(sweeper, "queue_backlog", lambda: 0)
    monkeypatch.setattr(sweeper, "send_stage_messages", sent)
    capsys.readouterr()
    sweeper.sweep_once()
    metrics = by_metric(emf_lines(capsys.readouterr().out))
    assert stage_row(run_id, "a").status == "failed"
    mine = [m for m in metrics.get("StagesFinished", []) if m["runId"] == str(run_id)]
    assert [(m["stageId"], m["Outcome"]) for m in mine] == [("a", "failed")], sorted(metrics)
