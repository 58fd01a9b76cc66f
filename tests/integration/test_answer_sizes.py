"""Answers the deployed API can return: a Lambda function's synchronous response is at most
6 MiB of proxy JSON, in which the body is a JSON string (each `"` and `\\` in it escaped
again); API Gateway answers 502 beyond. Locally nothing limits an answer, so these measure
each answer as the deployed function would return it, with the deployed caps."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import requests
from sqlalchemy import text

from chalicelib.config import reset_settings
from chalicelib.core import api as run_ids
from chalicelib.core.encoding import dumps, served_size
from chalicelib.db import session_scope
from chalicelib.engine import handlers
from chalicelib.workflows import control, runs
from chalicelib.workflows.definition import ExecuteRequest
from tests.integration.conftest import Api, register_agent, unique_capability
from tests.integration.test_delivery import principal_of, record, stage_row
from tests.support.agents import ScriptedAgent, error, ok, raw

LAMBDA_RESPONSE_LIMIT = 6 * 1024 * 1024  # 6,291,456 bytes of proxy response JSON


def deployed_default(parameter: str) -> int:
    with open("infra/template.json") as template:
        return int(json.load(template)["Parameters"][parameter]["Default"])


def proxy_size(response: requests.Response) -> int:
    """The size of the Lambda proxy response the deployed API function would return for
    this answer (the runtime serialises the handler's dict with json.dumps)."""
    proxy = {
        "statusCode": response.status_code,
        "headers": {k: v for k, v in response.headers.items() if k.lower() != "content-length"},
        "multiValueHeaders": {},
        "body": response.text,
        "isBase64Encoded": False,
    }
    return len(json.dumps(proxy).encode("utf-8"))


@pytest.fixture
def deployed_caps(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("MAOF_RUN_MAX_OUTPUT_BYTES", str(deployed_default("RunMaxOutputBytes")))
    reset_settings()
    yield
    monkeypatch.undo()
    reset_settings()


def quotes(stored: int) -> str:
    """A string of `"` whose stored JSON is `stored` bytes: the worst an output of the
    stage cap can do in the proxy JSON (each `\\"` escaped again)."""
    return '"' * ((stored - 2) // 2)


def big_get(client: Api, path: str) -> requests.Response:
    headers = {"Authorization": f"Bearer {client.token}"}
    return requests.get(client.base_url + path, headers=headers, timeout=120)


def submit(client: Api, body: dict[str, Any]) -> requests.Response:
    headers = {"Authorization": f"Bearer {client.token}"}
    return requests.post(
        client.base_url + "/workflows/execute", json=body, headers=headers, timeout=60
    )


def stages_answering(
    client: Api, agents: list[ScriptedAgent], output: str, name: str
) -> tuple[str, list[dict]]:
    """Three independent stages (input `1`) whose agent answers `output`."""
    agent = ScriptedAgent(default=ok(output)).start()
    agents.append(agent)
    capability = unique_capability(name)
    register_agent(client, capability, endpoint=agent.url)
    stages = [
        {"id": sid, "name": sid, "agentCapability": capability, "input": 1}
        for sid in ("a", "b", "c")
    ]
    return capability, stages


def megabyte_stages(client: Api, agents: list[ScriptedAgent]) -> tuple[str, list[dict]]:
    """Three independent stages each answering an output at the stage cap (1 MB stored)
    made of `"`."""
    return stages_answering(client, agents, quotes(999_980), "big")


def test_a_completed_runs_detail_within_the_deployed_caps_fits_a_lambda_response(
    user: Api, sent, deployed_caps, agents
):
    """Outputs of `"` at the stage cap and a workflow input of them (each `\\"` 4 bytes in
    the Lambda response): the run cap counts them as served, so the stage that would take
    the detail past what a Lambda response holds fails, naming the cap."""
    _, stages = megabyte_stages(user, agents)
    answer = submit(user, {"workflow": {"name": "big", "stages": stages}, "input": '"' * 100_000})
    assert answer.status_code == 202, answer.text[:500]
    run_ref = answer.json()["data"]["workflowRunId"]
    run_id = run_ids.parse_run_ref(run_ref)
    handlers.run_stage_batch([record(run_id, "a")])
    handlers.run_stage_batch([record(run_id, "b")])
    # 400 KB of input and 2 MB an output as served: a second output passes the cap.
    rows = [stage_row(run_id, sid) for sid in ("a", "b", "c")]
    assert [row.status for row in rows] == ["completed", "failed", "skipped"]
    assert "MAOF_RUN_MAX_OUTPUT_BYTES" in (rows[1].error_message or "")
    detail = big_get(user, f"/workflows/{run_ref}")
    assert detail.status_code == 200
    assert proxy_size(detail) < LAMBDA_RESPONSE_LIMIT
    export = big_get(user, f"/workflows/{run_ref}/audit/export")
    assert export.status_code == 200
    assert proxy_size(export) < LAMBDA_RESPONSE_LIMIT


def test_a_fan_in_failing_on_the_run_cap_keeps_the_detail_within_a_lambda_response(
    user: Api, sent, deployed_caps, agents
):
    """The workflow input counts against the run cap (a run is refused whose input alone
    passes it), and a fan-in stage whose input is what would pass it fails without
    storing that input: the failed run's detail fits."""
    assert deployed_default("RunMaxOutputBytes") == 2_500_000  # the sizes below assume it
    big = ScriptedAgent(default=ok(quotes(400_002))).start()  # 800,004 bytes as served
    small = ScriptedAgent(default=ok(1)).start()
    agents.extend([big, small])
    big_cap, small_cap = unique_capability("big"), unique_capability("small")
    register_agent(user, big_cap, endpoint=big.url)
    register_agent(user, small_cap, endpoint=small.url)
    stages: list[dict[str, Any]] = [
        {"id": sid, "name": sid, "agentCapability": big_cap, "input": 1} for sid in ("a", "b", "c")
    ]
    fan_in = {"id": "d", "name": "d", "agentCapability": small_cap, "input": "${workflow.input}"}
    stages.append(fan_in | {"dependencies": ["a", "b", "c"]})
    workflow = {"name": "big", "stages": stages}
    # 960 KB of body (emoji sent as UTF-8), 3.36 MB as served: past the cap on its own.
    headers = {"Authorization": f"Bearer {user.token}", "Content-Type": "application/json"}
    body = json.dumps({"workflow": workflow, "input": "\U0001f600" * 240_000}, ensure_ascii=False)
    refused = requests.post(
        user.base_url + "/workflows/execute", data=body.encode(), headers=headers, timeout=60
    )
    assert refused.status_code == 400, refused.text[:500]
    assert "MAOF_RUN_MAX_OUTPUT_BYTES" in refused.json()["error"]["message"]
    # 80,004 bytes as served: with a, b and c's inputs and outputs, 2,480,019 of the
    # 2,500,000; d's input (the workflow input again) is what passes the cap.
    answer = submit(user, {"workflow": workflow, "input": '"' * 20_000})
    assert answer.status_code == 202, answer.text[:500]
    run_ref = answer.json()["data"]["workflowRunId"]
    run_id = run_ids.parse_run_ref(run_ref)
    handlers.run_stage_batch([record(run_id, sid) for sid in ("a", "b", "c")])
    for sid in ("a", "b", "c"):
        assert stage_row(run_id, sid).status == "completed"
    handlers.run_stage_batch([record(run_id, "d")])
    row = stage_row(run_id, "d")
    assert row.status == "failed"
    assert "MAOF_RUN_MAX_OUTPUT_BYTES" in (row.error_message or "")
    assert row.input is None, "the input that would pass the cap is not stored"
    detail = big_get(user, f"/workflows/{run_ref}")
    assert detail.status_code == 200
    assert detail.json()["data"]["status"] == "failed"
    assert proxy_size(detail) < LAMBDA_RESPONSE_LIMIT


def test_a_runs_audit_trail_of_agent_retries_fits_a_lambda_response(user: Api, sent, agents):
    """Each retry's audit entry keeps the agent's error text: 100 stages of 10 retries each
    of 1,000 emoji (12 bytes each once served) made a 13 MB trail. Kept to 1,000 bytes as
    served, the trail fits."""
    answer_body = {"status": "error", "code": "C" * 100, "message": "\U0001f600" * 1000}
    failing = ScriptedAgent(default=raw(json.dumps(answer_body | {"retryable": True}).encode()))
    agents.append(failing.start())
    capability = unique_capability("retrying")
    register_agent(user, capability, endpoint=failing.url, maxConcurrentTasks=100)
    ids = [f"s{i}" for i in range(100)]
    config = {"retries": 10, "backoffMs": 0, "maxBackoffMs": 0}
    stages = [
        {"id": s, "name": s, "agentCapability": capability, "input": 1, "config": config}
        for s in ids
    ]
    answer = submit(user, {"workflow": {"name": "retries", "stages": stages}})
    assert answer.status_code == 202, answer.text[:500]
    run_ref = answer.json()["data"]["workflowRunId"]
    run_id = run_ids.parse_run_ref(run_ref)
    for _ in range(20):  # 11 attempts of each stage, as many rounds as the run needs
        for start in range(0, len(ids), 10):
            handlers.run_stage_batch([record(run_id, s) for s in ids[start : start + 10]])
        if big_get(user, f"/workflows/{run_ref}").json()["data"]["status"] == "failed":
            break
    trail = big_get(user, f"/workflows/{run_ref}/audit")
    assert trail.status_code == 200, trail.text[:300]
    logs = trail.json()["data"]["logs"]
    assert sum(entry["action"] == "retry" for entry in logs) >= 900
    assert proxy_size(trail) < LAMBDA_RESPONSE_LIMIT


def test_the_export_of_a_completed_run_at_the_deployed_cap_fits_a_lambda_response(
    user: Api, sent, deployed_caps, agents
):
    """The export carries every stage's output and the run's output, the final stages'
    outputs again: twice the run cap as served. The deployed cap leaves that room."""
    cap = deployed_default("RunMaxOutputBytes")
    # Each stage: an output of m quotes (2m + 2 bytes stored, 4m + 4 as served, the worst
    # a byte can do) and its input `1`; the workflow input is `null` (4). Just within the cap.
    m = (cap - 4 - 3 * 5) // 12
    _, stages = stages_answering(user, agents, '"' * m, "sinks")
    answer = submit(user, {"workflow": {"name": "sinks", "stages": stages}})
    assert answer.status_code == 202, answer.text[:500]
    run_ref = answer.json()["data"]["workflowRunId"]
    run_id = run_ids.parse_run_ref(run_ref)
    handlers.run_stage_batch([record(run_id, sid) for sid in ("a", "b", "c")])
    assert big_get(user, f"/workflows/{run_ref}").json()["data"]["status"] == "completed"
    export = big_get(user, f"/workflows/{run_ref}/audit/export")
    assert export.status_code == 200, export.text[:300]
    assert len(export.json()["data"]["outputs"]) == 4  # a, b, c and the run's
    assert proxy_size(export) < LAMBDA_RESPONSE_LIMIT


def counted_bytes(run_id: uuid.UUID) -> int:
    with session_scope() as session:
        query = text("SELECT output_bytes FROM workflow_runs WHERE id = :id")
        return int(session.execute(query, {"id": run_id}).scalar_one())


def test_a_failed_stages_input_counts_against_the_run_cap_until_a_retry_clears_it(
    user: Api, sent, agents, monkeypatch
):
    """fail_stage stores the stage's input, and counts it: the run's detail answers it. A
    retry clears it, and gives its share of MAOF_RUN_MAX_OUTPUT_BYTES back, or each
    retry of the run would shrink what the run may store."""
    broken = ScriptedAgent(default=error("BROKEN", retryable=False)).start()
    agents.append(broken)
    capability = unique_capability("broken")
    register_agent(user, capability, endpoint=broken.url)
    stage = {"id": "a", "name": "a", "agentCapability": capability, "input": '"' * 1000}
    # Every send kept (the retry's too): a poller another test left running would
    # otherwise take the stage first.
    monkeypatch.setattr(control, "send_stage_messages", sent)
    body = ExecuteRequest.model_validate({"workflow": {"name": "failing", "stages": [stage]}})
    run_ref = runs.submit(principal_of(user), body).data.workflow_run_id
    run_id = run_ids.parse_run_ref(run_ref)
    submitted = counted_bytes(run_id)
    assert submitted == served_size("null")  # the workflow input
    for _ in range(2):
        handlers.run_stage_batch([record(run_id, "a")])
        row = stage_row(run_id, "a")
        assert row.status == "failed" and row.input == '"' * 1000
        assert counted_bytes(run_id) == submitted + served_size(dumps('"' * 1000))
        retried = user.post(f"/workflows/{run_ref}/retry")
        assert retried.status_code == 202, retried.text
        assert counted_bytes(run_id) == submitted
