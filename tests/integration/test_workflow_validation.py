"""POST /workflows/execute refuses bad definitions up front, naming the offending stage;
GET /workflows lists a user's runs newest first, filtered and paged."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text

from chalicelib.core.api import parse_run_ref
from chalicelib.db import session_scope
from tests.integration.conftest import (
    Api,
    register_agent,
    unique_capability,
    wait_for_run,
)

CAPABILITY = "validation-only"  # never registered: these runs are refused before they run


def stage(sid: str, *deps: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": sid,
        "name": sid.upper(),
        "agentCapability": CAPABILITY,
        "dependencies": list(deps),
        **fields,
    }


def workflow(*stages: dict[str, Any], name: str = "validation") -> dict[str, Any]:
    return {"workflow": {"name": name, "stages": list(stages)}}


def refused(client: Api, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/workflows/execute", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    return dict(error)


def fields_of(error: dict[str, Any]) -> list[str]:
    return [d["field"] for d in error["details"]]


def submit(client: Api, body: dict[str, Any]) -> str:
    response = client.post("/workflows/execute", body)
    assert response.status_code == 202, response.text
    return str(response.json()["data"]["workflowRunId"])


# ------------------------------------------------------------------ execute: refused


def test_a_workflow_without_stages_is_refused(user):
    error = refused(user, workflow())
    assert fields_of(error) == ["workflow.stages"]


def test_a_workflow_of_101_stages_is_refused(user):
    stages = [stage(f"s{i}") for i in range(101)]
    error = refused(user, workflow(*stages))
    assert fields_of(error) == ["workflow.stages"]


def test_a_duplicate_stage_id_is_refused_naming_it(user):
    error = refused(user, workflow(stage("fetch"), stage("parse", "fetch"), stage("fetch")))
    assert "'fetch'" in error["message"]
    assert fields_of(error) == ["workflow.stages.2.id"]


def test_a_dependency_on_an_unknown_stage_is_refused_naming_both(user):
    error = refused(user, workflow(stage("fetch"), stage("parse", "fetch", "download")))
    assert "'parse'" in error["message"]
    assert "'download'" in error["message"]
    assert fields_of(error) == ["workflow.stages.1.dependencies"]


def test_a_stage_depending_on_itself_is_refused(user):
    error = refused(user, workflow(stage("fetch"), stage("loop", "fetch", "loop")))
    assert "'loop'" in error["message"]
    assert "itself" in error["message"]
    assert fields_of(error) == ["workflow.stages.1.dependencies"]


def test_a_two_stage_cycle_is_refused_naming_its_stages(user):
    error = refused(user, workflow(stage("a", "b"), stage("b", "a")))
    assert "cycle" in error["message"]
    assert "a -> b -> a" in error["message"] or "b -> a -> b" in error["message"]
    assert fields_of(error)[0].endswith(".dependencies")


def test_a_three_stage_cycle_is_refused_naming_its_stages(user):
    error = refused(
        user,
        workflow(stage("start"), stage("x", "start", "z"), stage("y", "x"), stage("z", "y")),
    )
    assert "cycle" in error["message"]
    for sid in ("x", "y", "z"):
        assert f"{sid} -> " in error["message"] or error["message"].endswith(f" -> {sid}")
    assert "start" not in error["message"]


def test_a_reference_to_a_stage_that_is_not_an_ancestor_is_refused(user):
    error = refused(
        user,
        workflow(
            stage("left"),
            stage("right"),
            stage("join", "left", input={"r": "${right.output.result}"}),
        ),
    )
    assert "'join'" in error["message"]
    assert "${right.output.result}" in error["message"]
    assert fields_of(error) == ["workflow.stages.2.input"]


@pytest.mark.parametrize(
    ("text", "written"),
    [
        ("${workflow.inputs.text}", "${workflow.inputs.text}"),  # a typo of workflow.input
        ("${a.outputs.result}", "${a.outputs.result}"),  # a typo of <stage>.output
        ("run `echo ${HOME}` for me", "${HOME}"),  # literal text that looks like one
    ],
)
def test_a_malformed_reference_is_refused_naming_it_and_where(user, text, written):
    body = workflow(stage("a"), stage("b", "a", input={"text": text}))
    error = refused(user, {**body, "input": {"text": "hi"}})
    assert "'b'" in error["message"]
    assert written in error["message"]
    assert "${workflow.input.<path>} or ${<stageId>.output.<path>}" in error["message"]
    assert fields_of(error) == ["workflow.stages.1.input.text"]


def test_text_with_a_literal_reference_sign_is_accepted_from_the_workflow_input(user):
    body = workflow(stage("a", input={"text": "do: ${workflow.input.cmd}", "${HOME}": "a key"}))
    submit(user, {**body, "input": {"cmd": "run `echo ${HOME}` for me"}})


def test_a_reference_to_a_transitive_ancestor_is_accepted(user):
    submit(
        user,
        workflow(
            stage("a"),
            stage("b", "a"),
            stage("c", "b", input="from a: ${a.output.result}"),
        ),
    )


@pytest.mark.parametrize("capability", ["Bad Tag", "UPPER", "a..b", "", "tag\n"])
def test_a_bad_capability_tag_is_refused_naming_the_stage(user, capability):
    error = refused(user, workflow(stage("ok"), stage("bad", agentCapability=capability)))
    assert fields_of(error) == ["workflow.stages.1.agentCapability"]


def test_a_bad_stage_id_is_refused(user):
    error = refused(user, workflow(stage("has space")))
    assert fields_of(error) == ["workflow.stages.0.id"]


def test_a_workflow_without_a_name_is_refused(user):
    body = workflow(stage("a"))
    del body["workflow"]["name"]
    error = refused(user, body)
    assert fields_of(error) == ["workflow.name"]
    assert error["details"][0]["message"] == "is required"


def test_a_request_without_a_workflow_is_refused(user):
    assert fields_of(refused(user, {"input": {"x": 1}})) == ["workflow"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**workflow(stage("a")), "priority": "high"}, "priority"),
        ({"workflow": {"name": "w", "stages": [stage("a")], "version": 2}}, "workflow.version"),
        (
            {"workflow": {"name": "w", "stages": [stage("a"), stage("b", retries=3)]}},
            "workflow.stages.1.retries",
        ),
    ],
)
def test_an_unknown_field_is_refused_at_every_level(user, body, field):
    error = refused(user, body)
    assert fields_of(error) == [field]
    assert error["details"][0]["message"] == "unknown field"


@pytest.mark.parametrize("value", [True, False, "3", " 300 ", "", 300.5])
@pytest.mark.parametrize(
    ("place", "field"),
    [
        ("timeoutMs", "workflow.stages.0.config.timeoutMs"),
        ("retries", "workflow.stages.0.config.retries"),
        ("backoffMs", "workflow.stages.0.config.backoffMs"),
        ("maxBackoffMs", "workflow.stages.0.config.maxBackoffMs"),
        ("workflow.timeoutMs", "workflow.timeoutMs"),
    ],
)
def test_an_integer_setting_that_is_a_boolean_or_a_string_is_refused(user, value, place, field):
    """JSON's `true` and "3" are not integers (they were taken as 1 and 3)."""
    body = workflow(stage("a"))
    if place.startswith("workflow."):
        body["workflow"]["timeoutMs"] = value
    else:
        body["workflow"]["stages"][0]["config"] = {place: value}
    error = refused(user, body)
    assert fields_of(error) == [field]
    assert "integer" in error["details"][0]["message"]


def test_an_integer_setting_written_with_a_zero_fraction_is_accepted(user):
    body = workflow(stage("a", config={"timeoutMs": 3000.0, "retries": 2.0}))
    body["workflow"]["timeoutMs"] = 60000.0
    run_id = parse_run_ref(submit(user, body))
    with session_scope() as session:
        stored = session.execute(
            text("SELECT definition FROM workflow_runs WHERE id = :id"), {"id": run_id}
        ).scalar_one()
    assert stored["timeoutMs"] == 60000
    assert stored["stages"][0]["config"] == {
        "timeoutMs": 3000,
        "retries": 2,
        "backoffMs": None,
        "maxBackoffMs": None,
    }


def test_a_refused_workflow_creates_no_run(user):
    refused(user, workflow(stage("a", "b"), stage("b", "a")))
    assert user.get("/workflows").json()["data"]["meta"]["total"] == 0


# ------------------------------------------------------------------ execute: accepted


def test_a_chain_of_100_stages_is_accepted(user):
    stages = [stage("s0")] + [stage(f"s{i}", f"s{i - 1}") for i in range(1, 100)]
    run_id = submit(user, workflow(*stages))
    run = user.get(f"/workflows/{run_id}").json()["data"]
    assert run["progress"]["total"] == 100
    assert [s["stageId"] for s in run["stages"]] == [f"s{i}" for i in range(100)]


def test_a_chain_of_100_mock_stages_runs_its_whole_length(user, poller):
    """Each input holds the previous output, which the mock echoes: it stops echoing where
    that would nest past MAOF_AGENT_MAX_OUTPUT_DEPTH (the run failed half-way before)."""
    capability = unique_capability("chain")
    register_agent(user, capability)
    stages = [stage("s0", agentCapability=capability)]
    stages += [stage(f"s{i}", f"s{i - 1}", agentCapability=capability) for i in range(1, 100)]
    run = wait_for_run(user, submit(user, workflow(*stages)), timeout=60)
    assert run["status"] == "completed", run.get("errorMessage")
    assert run["progress"]["completed"] == 100


# ------------------------------------------------------------------ list


def test_runs_are_listed_newest_first_with_page_meta(user):
    submitted = [submit(user, workflow(stage("a"), name=f"run-{i}")) for i in range(3)]
    submitted.reverse()
    data = user.get("/workflows").json()["data"]
    assert [r["workflowRunId"] for r in data["runs"]] == submitted
    assert data["meta"] == {"total": 3, "page": 1, "limit": 20, "pages": 1}

    first = user.get("/workflows", params={"limit": 2}).json()["data"]
    assert [r["workflowRunId"] for r in first["runs"]] == submitted[:2]
    assert first["meta"] == {"total": 3, "page": 1, "limit": 2, "pages": 2}
    second = user.get("/workflows", params={"limit": 2, "page": 2}).json()["data"]
    assert [r["workflowRunId"] for r in second["runs"]] == submitted[2:]
    assert second["meta"] == {"total": 3, "page": 2, "limit": 2, "pages": 2}
    beyond = user.get("/workflows", params={"limit": 2, "page": 3}).json()["data"]
    assert beyond == {"runs": [], "meta": {"total": 3, "page": 3, "limit": 2, "pages": 2}}


def test_runs_are_filtered_by_status(user, poller):
    capability = unique_capability("listed")
    register_agent(user, capability)
    done = submit(user, workflow(stage("a", agentCapability=capability)))
    failed = submit(user, workflow(stage("a", agentCapability=unique_capability("nobody"))))
    assert wait_for_run(user, done)["status"] == "completed"
    assert wait_for_run(user, failed)["status"] == "failed"

    def runs(status: str) -> list[str]:
        response = user.get("/workflows", params={"status": status})
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        assert data["meta"]["total"] == len(data["runs"])
        return [r["workflowRunId"] for r in data["runs"]]

    assert runs("completed") == [done]
    assert runs("failed") == [failed]
    assert runs("queued") == []
    assert runs("in_progress") == []
    summary = user.get("/workflows", params={"status": "completed"}).json()["data"]["runs"][0]
    assert summary["progress"] == {"total": 1, "completed": 1, "failed": 0}


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"status": "done"}, "status"),
        ({"status": "COMPLETED"}, "status"),
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"page": 0}, "page"),
        ({"sort": "asc"}, "sort"),
    ],
)
def test_invalid_list_parameters_are_a_400(user, params, field):
    response = user.get("/workflows", params=params)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    assert fields_of(error) == [field]


@pytest.mark.parametrize(
    "run_id",
    ["not-a-run-id", "wfr-not-a-uuid", "wfr-00000000-0000-0000-0000-000000000000", "wfr-"],
)
def test_an_unknown_run_id_is_a_404(user, run_id):
    for suffix in ("", "/result", "/audit"):
        response = user.get(f"/workflows/{run_id}{suffix}")
        assert response.status_code == 404, (suffix, response.text)
        assert response.json()["error"]["code"] == "NOT_FOUND"
