"""check_dag on workflow definitions: every rejection names the offending stage and field."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest

from chalicelib.core import errors
from chalicelib.workflows.definition import ExecuteRequest, WorkflowDefinition, check_dag


def stage(sid: str, *deps: str, input: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": sid,
        "name": sid.upper(),
        "agentCapability": "work",
        "dependencies": list(deps),
    }
    if input is not None:
        body["input"] = input
    return body


def workflow(*stages: dict[str, Any]) -> WorkflowDefinition:
    return WorkflowDefinition.model_validate({"name": "wf", "stages": list(stages)})


def rejected(*stages: dict[str, Any]) -> errors.ValidationError:
    with pytest.raises(errors.ValidationError) as caught:
        check_dag(workflow(*stages))
    assert caught.value.code == "VALIDATION_ERROR"
    return caught.value


def field_of(error: errors.ValidationError) -> str:
    return str(error.details[0]["field"])


@pytest.mark.parametrize(
    "stages",
    [
        [stage("only")],
        [stage("a"), stage("b", "a"), stage("c", "b")],
        [stage("a"), stage("b", "a"), stage("c", "a"), stage("d", "b", "c")],
        [stage("d", "b", "c"), stage("c", "a"), stage("b", "a"), stage("a")],  # any order
        [stage("x"), stage("y"), stage("z")],
    ],
)
def test_a_valid_dag_passes(stages):
    check_dag(workflow(*stages))


def test_a_duplicate_stage_id_is_rejected_at_its_second_occurrence():
    error = rejected(stage("a"), stage("b"), stage("a"))
    assert "'a'" in error.message
    assert "more than once" in error.message
    assert field_of(error) == "workflow.stages.2.id"


def test_a_dependency_on_an_unknown_stage_is_rejected_naming_both():
    error = rejected(stage("a"), stage("b", "a", "ghost"))
    assert "'b'" in error.message and "'ghost'" in error.message
    assert field_of(error) == "workflow.stages.1.dependencies"


def test_a_stage_depending_on_itself_is_rejected():
    error = rejected(stage("a"), stage("loop", "loop"))
    assert "'loop' depends on itself" in error.message
    assert field_of(error) == "workflow.stages.1.dependencies"


def test_a_dependency_listed_twice_is_rejected():
    error = rejected(stage("a"), stage("b", "a", "a"))
    assert "'b'" in error.message
    assert field_of(error) == "workflow.stages.1.dependencies"


def test_a_two_stage_cycle_is_rejected_naming_its_path():
    error = rejected(stage("a", "b"), stage("b", "a"))
    assert "cycle" in error.message
    assert error.message.endswith("a -> b -> a") or error.message.endswith("b -> a -> b")


def test_a_three_stage_cycle_names_every_stage_in_it_and_nothing_else():
    error = rejected(stage("root"), stage("x", "root", "z"), stage("y", "x"), stage("z", "y"))
    path = error.message.split(": ", 1)[1].split(" -> ")
    assert path[0] == path[-1]
    assert set(path) == {"x", "y", "z"}
    assert len(path) == 4
    assert "root" not in error.message
    index = {"x": 1, "y": 2, "z": 3}[path[0]]
    assert field_of(error) == f"workflow.stages.{index}.dependencies"


def test_a_cycle_hanging_off_an_acyclic_part_is_found():
    stages = [stage("s0")] + [stage(f"s{i}", f"s{i - 1}") for i in range(1, 50)]
    stages[10] = stage("s10", "s9", "s40")  # s10 -> ... -> s40 -> s10
    error = rejected(*stages)
    assert "cycle" in error.message
    assert "s10" in error.message and "s40" in error.message


def test_a_long_chain_of_a_hundred_stages_is_valid():
    stages = [stage("s0")] + [stage(f"s{i}", f"s{i - 1}") for i in range(1, 100)]
    check_dag(workflow(*stages))


def test_a_stage_may_reference_its_dependencies_and_their_ancestors():
    check_dag(
        workflow(
            stage("a"),
            stage("b", "a", input={"x": "${a.output.result}"}),
            stage("c", "b", input=["${a.output}", "from b: ${b.output.result}"]),
        )
    )


def test_a_reference_to_a_stage_that_is_not_an_ancestor_is_rejected():
    error = rejected(
        stage("a"),
        stage("b"),
        stage("c", "a", input={"deep": ["${b.output.result}"]}),
    )
    assert "'c'" in error.message
    assert "${b.output.result}" in error.message
    assert field_of(error) == "workflow.stages.2.input"


def test_a_reference_to_a_descendant_is_rejected():
    error = rejected(stage("a", input="${b.output}"), stage("b", "a"))
    assert "'a'" in error.message and "${b.output}" in error.message
    assert field_of(error) == "workflow.stages.0.input"


def test_a_stage_cannot_reference_its_own_output():
    error = rejected(stage("a", input="${a.output.x}"))
    assert "${a.output.x}" in error.message


def test_a_reference_to_an_unknown_stage_is_rejected():
    error = rejected(stage("a", input="${nowhere.output}"))
    assert "'a'" in error.message and "${nowhere.output}" in error.message


def test_workflow_input_references_need_no_dependency():
    check_dag(
        workflow(stage("a", input={"q": "${workflow.input.query}", "all": "${workflow.input}"}))
    )


def test_a_stage_id_with_a_trailing_newline_is_not_a_valid_id():
    with pytest.raises(pydantic.ValidationError):
        workflow(stage("a\n"))


@pytest.mark.parametrize("capability", ["Bad Tag", "UPPER", "a..b", "-a", "a-", "", "x\n", "é"])
def test_a_bad_capability_tag_is_not_a_valid_stage(capability):
    with pytest.raises(pydantic.ValidationError) as caught:
        WorkflowDefinition.model_validate(
            {"name": "wf", "stages": [{"id": "a", "name": "A", "agentCapability": capability}]}
        )
    assert caught.value.errors()[0]["loc"] == ("stages", 0, "agentCapability")


def test_an_execute_request_refuses_unknown_fields_at_every_level():
    good = {"workflow": {"name": "wf", "stages": [stage("a")]}}
    ExecuteRequest.model_validate(good)
    for bad, loc in (
        ({**good, "extra": 1}, ("extra",)),
        ({"workflow": {**good["workflow"], "extra": 1}}, ("workflow", "extra")),
        (
            {"workflow": {"name": "wf", "stages": [{**stage("a"), "extra": 1}]}},
            ("workflow", "stages", 0, "extra"),
        ),
    ):
        with pytest.raises(pydantic.ValidationError) as caught:
            ExecuteRequest.model_validate(bad)
        assert caught.value.errors()[0]["loc"] == loc
