"""End to end through HTTP, LocalStack SQS and the poller: runs complete, data flows,
failures are named, and users only ever see their own runs."""

from __future__ import annotations

from tests.integration.conftest import (
    register_agent,
    unique_capability,
    wait_for_run,
)


def submit(client, stages, workflow_input=None, name="pipeline"):
    body = {"workflow": {"name": name, "stages": stages}}
    if workflow_input is not None:
        body["input"] = workflow_input
    response = client.post("/workflows/execute", body)
    assert response.status_code == 202, response.text
    data = response.json()["data"]
    assert data["status"] == "queued"
    assert data["workflowRunId"].startswith("wfr-")
    return data["workflowRunId"]


def test_linear_pipeline_completes_and_each_output_reaches_the_next(user, poller):
    extract, translate, summarize = (unique_capability(p) for p in ("extract", "translate", "sum"))
    for capability in (extract, translate, summarize):
        register_agent(user, capability)
    run_id = submit(
        user,
        [
            {"id": "extract", "name": "Extract", "agentCapability": extract},
            {
                "id": "translate",
                "name": "Translate",
                "agentCapability": translate,
                "dependencies": ["extract"],
                "input": {"points": "${extract.output.result}", "lang": "${workflow.input.lang}"},
            },
            {
                "id": "summarize",
                "name": "Summarize",
                "agentCapability": summarize,
                "dependencies": ["translate"],
            },
        ],
        {"text": "hello world", "lang": "es"},
    )
    run = wait_for_run(user, run_id)
    assert run["status"] == "completed", run
    stages = {s["stageId"]: s for s in run["stages"]}
    assert stages["extract"]["input"] == {"text": "hello world", "lang": "es"}
    assert stages["translate"]["input"] == {
        "points": stages["extract"]["output"]["result"],
        "lang": "es",
    }
    assert stages["summarize"]["input"] == {"translate": stages["translate"]["output"]}
    assert run["progress"] == {"total": 3, "completed": 3, "failed": 0, "current": None}

    result = user.get(f"/workflows/{run_id}/result")
    assert result.status_code == 200
    output = result.json()["data"]["output"]
    assert output == stages["summarize"]["output"]
    assert (
        output["received"]["translate"]["received"]["points"]
        == stages["extract"]["output"]["result"]
    )

    audit = user.get(f"/workflows/{run_id}/audit").json()["data"]
    assert audit["chain"]["valid"] is True
    assert [e["action"] for e in audit["logs"]] == [
        "submit",
        "execute",
        "execute",
        "execute",
        "complete",
    ]
    assert audit["chain"]["head"] == audit["logs"][-1]["hash"]


def test_diamond_runs_both_branches_after_a_and_d_once_after_both(user, poller):
    capability = unique_capability("diamond")
    register_agent(user, capability)
    register_agent(user, capability)
    stage = lambda sid, deps=(): {  # noqa: E731
        "id": sid,
        "name": sid.upper(),
        "agentCapability": capability,
        "dependencies": list(deps),
    }
    run_id = submit(
        user, [stage("a"), stage("b", ["a"]), stage("c", ["a"]), stage("d", ["b", "c"])]
    )
    run = wait_for_run(user, run_id)
    assert run["status"] == "completed", run
    stages = {s["stageId"]: s for s in run["stages"]}
    for branch in ("b", "c"):
        assert stages[branch]["startedAt"] >= stages["a"]["completedAt"]
    assert stages["d"]["startedAt"] >= max(stages["b"]["completedAt"], stages["c"]["completedAt"])
    assert set(stages["d"]["input"]) == {"b", "c"}
    audit = user.get(f"/workflows/{run_id}/audit").json()["data"]
    executed = [e["stageId"] for e in audit["logs"] if e["action"] == "execute"]
    assert sorted(executed) == ["a", "b", "c", "d"]
    assert stages["d"]["attempt"] == 1


def test_stage_whose_capability_no_agent_has_fails_the_run_naming_it(user, poller):
    capability = unique_capability("nobody")
    run_id = submit(
        user,
        [
            {"id": "first", "name": "First", "agentCapability": capability},
            {
                "id": "second",
                "name": "Second",
                "agentCapability": capability,
                "dependencies": ["first"],
            },
        ],
    )
    run = wait_for_run(user, run_id)
    assert run["status"] == "failed"
    assert capability in run["errorMessage"]
    assert "first" in run["errorMessage"]
    statuses = {s["stageId"]: s["status"] for s in run["stages"]}
    assert statuses == {"first": "failed", "second": "skipped"}
    assert user.get(f"/workflows/{run_id}/result").status_code == 404
    audit = user.get(f"/workflows/{run_id}/audit").json()["data"]
    assert [e["action"] for e in audit["logs"]] == ["submit", "fail", "skip"]
    assert audit["chain"]["valid"] is True


def test_unknown_reference_fails_the_stage_clearly(user, poller):
    capability = unique_capability("ref")
    register_agent(user, capability)
    run_id = submit(
        user,
        [
            {"id": "one", "name": "One", "agentCapability": capability},
            {
                "id": "two",
                "name": "Two",
                "agentCapability": capability,
                "dependencies": ["one"],
                "input": {"x": "${one.output.no.such.path}"},
            },
        ],
    )
    run = wait_for_run(user, run_id)
    assert run["status"] == "failed"
    assert "${one.output.no.such.path}" in run["errorMessage"]
    assert "'two'" in run["errorMessage"]


def test_other_users_get_404_on_every_run_endpoint_and_never_see_each_others_runs(
    user, api, poller
):
    capability = unique_capability("private")
    register_agent(user, capability)
    run_id = submit(user, [{"id": "s", "name": "S", "agentCapability": capability}])
    wait_for_run(user, run_id)
    stranger = api.as_new_user()
    for path in ("", "/result", "/audit"):
        response = stranger.get(f"/workflows/{run_id}{path}")
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "NOT_FOUND"
    assert stranger.get("/workflows").json()["data"]["runs"] == []
    mine = user.get("/workflows").json()["data"]
    assert [r["workflowRunId"] for r in mine["runs"]] == [run_id]
    assert mine["meta"] == {"total": 1, "page": 1, "limit": 20, "pages": 1}
