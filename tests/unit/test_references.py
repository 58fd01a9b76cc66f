"""References in stage inputs: whole values keep their JSON type, longer strings interpolate,
anything unresolvable fails with the reference as written, a `${...}` of neither form is
refused at submission, and an input's size is counted as the agent is sent it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import product
from typing import Any

import pytest

from chalicelib.agents import dispatch
from chalicelib.agents.dispatch import AgentTask
from chalicelib.config import reset_settings
from chalicelib.core import errors, references
from chalicelib.core.references import (
    InputTooLarge,
    Reference,
    UnresolvableReference,
    check_input_size,
    check_sent_size,
    expanded_size,
    references_in,
    resolve,
)
from chalicelib.workflows.definition import WorkflowDefinition, check_dag, check_input_sizes

WORKFLOW_INPUT = {"lang": "es", "limit": 3, "tags": ["a", "b"], "nested": {"deep": {"x": 1}}}
OUTPUTS = {
    "extract": {
        "count": 42,
        "ratio": 0.5,
        "points": ["p0", "p1", {"k": "v"}],
        "meta": {"ok": True, "missing": None, "words": {"first": "hola"}},
        "flag": False,
        "nothing": None,
        "text": "hello",
    },
    "step-2": ["zero", "one"],
}


def r(template):
    return resolve(template, WORKFLOW_INPUT, OUTPUTS)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("${extract.output.count}", 42),
        ("${extract.output.ratio}", 0.5),
        ("${extract.output.points}", ["p0", "p1", {"k": "v"}]),
        ("${extract.output.meta}", {"ok": True, "missing": None, "words": {"first": "hola"}}),
        ("${extract.output.flag}", False),
        ("${extract.output.meta.ok}", True),
        ("${extract.output.nothing}", None),
        ("${extract.output.meta.missing}", None),
        ("${extract.output.text}", "hello"),
    ],
)
def test_a_whole_value_reference_keeps_its_json_type(template, expected):
    value = r(template)
    assert value == expected
    assert type(value) is type(expected)


def test_a_whole_stage_output_is_referenced_without_a_path():
    assert r("${step-2.output}") == ["zero", "one"]
    assert r("${extract.output}") == OUTPUTS["extract"]


def test_nested_paths_and_list_indexes_are_followed():
    assert r("${extract.output.meta.words.first}") == "hola"
    assert r("${extract.output.points.0}") == "p0"
    assert r("${extract.output.points.2.k}") == "v"
    assert r("${step-2.output.1}") == "one"
    assert r("${workflow.input.nested.deep.x}") == 1
    assert r("${workflow.input.tags.1}") == "b"


def test_workflow_input_is_referenced_whole():
    assert r("${workflow.input}") == WORKFLOW_INPUT
    assert resolve("${workflow.input}", None, {}) is None
    assert resolve("${workflow.input}", [1, 2], {}) == [1, 2]


def test_references_inside_longer_strings_are_interpolated_as_text():
    assert r("translate to ${workflow.input.lang}!") == "translate to es!"
    assert r("${extract.output.text} / ${step-2.output.0}") == "hello / zero"


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("n=${extract.output.count}", "n=42"),
        ("flag=${extract.output.flag}", "flag=false"),
        ("none=${extract.output.nothing}", "none=null"),
        ("points=${step-2.output}", 'points=["zero", "one"]'),
    ],
)
def test_non_strings_interpolated_into_text_are_json_encoded(template, expected):
    assert r(template) == expected


def test_an_interpolated_object_is_json_that_decodes_to_the_value():
    text = r("meta: ${extract.output.meta}")
    assert text.startswith("meta: ")
    assert json.loads(text.removeprefix("meta: ")) == OUTPUTS["extract"]["meta"]


def test_templates_are_resolved_through_lists_and_objects():
    template = {
        "a": ["${extract.output.count}", {"b": "${workflow.input.lang}"}],
        "c": "x ${step-2.output.0}",
        "d": 7,
        "e": None,
    }
    assert r(template) == {"a": [42, {"b": "es"}], "c": "x zero", "d": 7, "e": None}


def test_values_without_references_are_returned_unchanged():
    for value in (None, 1, 2.5, True, "plain text", "$ {not} a reference", [1, "x"], {"k": "v"}):
        assert r(value) == value


@pytest.mark.parametrize(
    "template",
    [
        "${missing.output.x}",
        "${missing.output}",
        "text ${missing.output.x}",
    ],
)
def test_an_unknown_stage_is_unresolvable_naming_the_reference(template):
    with pytest.raises(UnresolvableReference, match="missing") as caught:
        r(template)
    assert "${missing.output" in str(caught.value)


@pytest.mark.parametrize(
    "reference",
    [
        "${extract.output.no.such.path}",
        "${extract.output.points.3}",
        "${extract.output.points.-1}",
        "${extract.output.points.x}",
        "${extract.output.count.deeper}",
        "${extract.output.text.0}",
        "${workflow.input.absent}",
        "${workflow.input.tags.9}",
    ],
)
def test_an_unknown_path_is_unresolvable_naming_the_reference(reference):
    with pytest.raises(UnresolvableReference) as caught:
        r(reference)
    assert reference in str(caught.value)
    with pytest.raises(UnresolvableReference) as caught:
        r({"in": [f"prefix {reference} suffix"]})
    assert reference in str(caught.value)


def test_a_non_ascii_digit_is_not_a_list_index_but_an_unknown_path():
    # "²".isdigit() is true, yet int("²") raises ValueError: that must not escape.
    with pytest.raises(UnresolvableReference, match=r"\$\{workflow\.input\.tags\.²\}"):
        r("${workflow.input.tags.²}")


def test_an_index_too_long_for_int_is_an_unknown_path():
    # int() of over 4,300 digits raises ValueError: it reached the client as a 500.
    index = "9" * 5000
    with pytest.raises(UnresolvableReference, match=r"no '9+' under tags"):
        r("${workflow.input.tags." + index + "}")
    assert expanded_size("${workflow.input.tags." + index + "}", WORKFLOW_INPUT, None) == 0


@pytest.mark.parametrize("template", [" ${workflow.input.limit} ", "${workflow.input.nested}\n"])
def test_whitespace_around_a_lone_reference_makes_it_text(template):
    """Only a string that is exactly one reference keeps the value's JSON type (a YAML
    block scalar's trailing newline made an object of what was written as text)."""
    resolved = r(template)
    assert isinstance(resolved, str)
    assert resolved.strip() in ("3", json.dumps(WORKFLOW_INPUT["nested"], sort_keys=True))
    sent = json.dumps(resolved, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    assert expanded_size(template, WORKFLOW_INPUT, OUTPUTS) == len(sent)


def test_a_reference_that_is_neither_input_nor_output_is_unresolvable():
    with pytest.raises(UnresolvableReference, match=r"\$\{foo\}"):
        r("${foo}")
    with pytest.raises(UnresolvableReference, match=r"\$\{extract\.input\.x\}"):
        r("see ${extract.input.x}")


def test_references_in_finds_every_reference_in_nested_structures():
    value = {
        "a": "${one.output.x}",
        "b": ["plain", {"c": "x ${two.output} and ${workflow.input.q.0}"}],
        "d": [[["${three.output.y.z}"]]],
        "e": 5,
        "f": None,
    }
    found = list(references_in(value))
    assert sorted(found, key=lambda ref: ref.text) == sorted(
        [
            Reference("${one.output.x}", "one", ("x",)),
            Reference("${two.output}", "two", ()),
            Reference("${workflow.input.q.0}", None, ("q", "0")),
            Reference("${three.output.y.z}", "three", ("y", "z")),
        ],
        key=lambda ref: ref.text,
    )


def test_references_in_skips_malformed_references_and_plain_values():
    assert list(references_in("${foo} and ${bar.baz}")) == []
    assert list(references_in(None)) == []
    assert list(references_in(12)) == []
    assert list(references_in({"${a.output}": "keys are not templates"})) == []


# ------------------------------------------------------------------ malformed at submission


def workflow_with(stage_input: Any) -> WorkflowDefinition:
    """Stage 'b', after 'a', with `stage_input`."""
    return WorkflowDefinition.model_validate(
        {
            "name": "refs",
            "stages": [
                {"id": "a", "name": "A", "agentCapability": "x"},
                {"id": "b", "name": "B", "agentCapability": "x", "dependencies": ["a"]}
                | {"input": stage_input},
            ],
        }
    )


def refusal(stage_input: Any) -> dict[str, str]:
    """The one {field, message} check_dag refuses `stage_input` with."""
    with pytest.raises(errors.ValidationError) as caught:
        check_dag(workflow_with(stage_input))
    [detail] = caught.value.details
    assert caught.value.message == detail["message"]
    return dict(detail)


@pytest.mark.parametrize(
    ("stage_input", "field", "written"),
    [
        (
            {"text": "${workflow.inputs.text}"},
            "workflow.stages.1.input.text",
            "${workflow.inputs.text}",
        ),
        ({"text": "${a.outputs.result}"}, "workflow.stages.1.input.text", "${a.outputs.result}"),
        ("run `echo ${HOME}` for me", "workflow.stages.1.input", "${HOME}"),
        (
            {"x": ["ok", {"y": "a ${a.output.r} b ${foo}"}]},
            "workflow.stages.1.input.x.1.y",
            "${foo}",
        ),
        (["${ }"], "workflow.stages.1.input.0", "${ }"),
        ("${a.input.r}", "workflow.stages.1.input", "${a.input.r}"),
        ("${workflow}", "workflow.stages.1.input", "${workflow}"),
    ],
)
def test_a_malformed_reference_is_refused_at_submission_naming_it_and_where(
    stage_input, field, written
):
    detail = refusal(stage_input)
    assert detail["field"] == field
    assert "Stage 'b'" in detail["message"]
    assert written in detail["message"]
    assert "${workflow.input.<path>} or ${<stageId>.output.<path>}" in detail["message"]


def test_the_first_malformed_reference_in_document_order_is_named():
    detail = refusal({"first": ["${one}", "${two}"], "second": "${three}"})
    assert detail["field"] == "workflow.stages.1.input.first.0"
    assert "${one}" in detail["message"]


@pytest.mark.parametrize(
    "stage_input",
    [
        None,
        "plain text",
        "$ {not} a reference, nor ${} nor ${ nor $HOME",
        {"${HOME}": "a key is never resolved, so never checked"},
        {"t": "${ workflow.input.text }", "u": ["from a: ${a.output.result}", 3, None]},
        "${a.output}",
    ],
)
def test_inputs_whose_every_reference_is_well_formed_are_accepted(stage_input):
    check_dag(workflow_with(stage_input))


TRICKY = [
    "${workflow.input.text}",
    " ${workflow.input.text} ",
    "${a.output}",
    "${workflow.input}",
    "${workflow.inputs.text}",
    "x ${a.outputs} y",
    "${a}${workflow.input.text}",
    "${workflow.input.text}${a}",
    "$${workflow.input.text}",
    "${${workflow.input.text}}",
    "${ }",
    "${}",
    "${.}",
    "${workflow.input.text",
    "{workflow.input.text}",
]


@pytest.mark.parametrize("template", TRICKY)
def test_submission_refuses_exactly_the_forms_resolve_refuses(template):
    """Given data for every well-formed reference, resolve fails on a template's form iff
    the submission is refused: nothing resolve reads escapes the check."""
    outputs = {"a": {"result": 1}}
    try:
        resolve({"k": [template]}, {"text": "t"}, outputs)
    except UnresolvableReference:
        resolve_refuses = True
    else:
        resolve_refuses = False
    try:
        check_dag(workflow_with({"k": [template]}))
    except errors.ValidationError as exc:
        refused = True
        assert exc.details[0]["field"] == "workflow.stages.1.input.k.0"
    else:
        refused = False
    assert refused == resolve_refuses, template


def test_text_holding_a_literal_dollar_brace_comes_from_the_workflow_input():
    """No escape exists for `${` in a stage input; text resolved into it is not read again."""
    literal = "run `echo ${HOME}` for me"
    check_dag(workflow_with({"whole": "${workflow.input.cmd}", "in": "do: ${workflow.input.cmd}"}))
    resolved = resolve(
        {"whole": "${workflow.input.cmd}", "in": "do: ${workflow.input.cmd}"},
        {"cmd": literal},
        {},
    )
    assert resolved == {"whole": literal, "in": f"do: {literal}"}


# ------------------------------------------------------------------ size as sent


SIZE_INPUT = {
    "items": ["é"] * 700,
    "quoted": 'say "hi" \\ then\n\t\x01\x7f 😀 \u2028',
    "number": 1.5,
    "object": {"z": [1, None, True], "a": "ü", "b": {"c": "d"}},
}
SIZE_OUTPUTS = {"s": {"list": ["x", {"k": "v é"}], "tab": "a\tb"}, "empty": []}


@pytest.mark.parametrize(
    "template",
    [
        "items: ${workflow.input.items}",
        "${workflow.input.items}",
        " ${workflow.input.object} ",
        "q=${workflow.input.quoted}; o=${workflow.input.object}; n=${workflow.input.number}",
        {"a": ["${workflow.input.quoted}", "${s.output}", "x${s.output.tab}y${s.output.list}"]},
        {'ké"y': {"deep": [[], {}, [None, 1, 2.5, False, "é 😀"]]}, "e": "${empty.output}"},
        ["${workflow.input}", "${workflow.input}", "again: ${workflow.input}"],
        'plain é 😀 " \\ ${} ${',
        [],
        {},
    ],
)
def test_the_size_counted_is_exactly_the_size_of_the_input_as_sent(template):
    resolved = resolve(template, SIZE_INPUT, SIZE_OUTPUTS)
    sent = json.dumps(resolved, ensure_ascii=False, separators=(",", ":"))  # as dispatch does
    assert expanded_size(template, SIZE_INPUT, SIZE_OUTPUTS) == len(sent.encode("utf-8"))


class Posted(Exception):
    """Raised by the fake transport with the request body dispatch built."""

    def __init__(self, body: bytes) -> None:
        super().__init__("posted")
        self.body = body


def bytes_of_input_as_posted(monkeypatch: pytest.MonkeyPatch, stage_input: Any) -> int:
    """The bytes the agent's request spends on `input`, from the body dispatch posts."""

    def capture(method: str, url: str, *, body: bytes, **kwargs: Any) -> Any:
        raise Posted(body)

    monkeypatch.setattr(dispatch, "pinned_request", capture)
    monkeypatch.setattr(dispatch, "is_mock", lambda endpoint: False)
    bodies = []
    for value in (stage_input, None):
        task = AgentTask("wfr-1", "s1", 1, "cap", value, "wf")
        with pytest.raises(Posted) as caught:
            dispatch.call_agent("https://agent.example/run", "token", "agent-1", task)
        bodies.append(caught.value.body)
    return len(bodies[0]) - len(bodies[1]) + len("null")


def test_the_size_counted_is_the_size_of_the_input_in_the_agents_request(monkeypatch):
    template = {"text": "items: ${workflow.input.items}", "q": "${workflow.input.quoted}"}
    posted = bytes_of_input_as_posted(monkeypatch, resolve(template, SIZE_INPUT, {}))
    assert expanded_size(template, SIZE_INPUT, {}) == posted


@pytest.fixture
def input_cap(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.setenv("MAOF_STAGE_MAX_INPUT_BYTES", "4096")
    reset_settings()
    yield 4096
    monkeypatch.undo()
    reset_settings()


def test_an_input_sent_as_it_is_is_held_to_the_cap(input_cap):
    check_sent_size({"text": "x" * (input_cap - 20)})
    with pytest.raises(InputTooLarge, match="MAOF_STAGE_MAX_INPUT_BYTES"):
        check_sent_size({"text": "é" * input_cap})


def test_a_stage_without_input_is_refused_at_submission_when_the_workflow_input_is_too_large(
    input_cap,
):
    """It is sent the workflow input as it is; a later stage's default input (its
    dependencies' outputs) is checked when it runs."""
    workflow = WorkflowDefinition.model_validate(
        {
            "name": "w",
            "stages": [
                {"id": "a", "name": "A", "agentCapability": "c"},
                {"id": "b", "name": "B", "agentCapability": "c", "dependencies": ["a"]},
            ],
        }
    )
    check_input_sizes(workflow, {"text": "x" * 100})
    with pytest.raises(errors.ValidationError) as caught:
        check_input_sizes(workflow, {"text": "x" * input_cap})
    assert caught.value.details[0]["field"] == "workflow.stages.0.input"


@pytest.mark.parametrize(
    "template", [None, "${workflow.input}", "all: ${workflow.input}", "${workflow.input.0}"]
)
def test_a_number_with_an_exponent_is_counted_as_stored_at_submission(input_cap, template):
    """The stage is resolved from the stored workflow input, where JSONB holds 1e308 (6
    bytes at submission) as 309 digits: an input checked at its written size was 45 times
    larger when the stage ran, and failed it."""
    workflow_input = [1e308] * (input_cap // 250)
    if template == "${workflow.input.0}":
        template, workflow_input = [template] * (input_cap // 250), [1e308]
    assert len(json.dumps(workflow_input)) < input_cap // 10
    stages = [{"id": "a", "name": "A", "agentCapability": "c", "input": template}]
    workflow = WorkflowDefinition.model_validate({"name": "w", "stages": stages})
    with pytest.raises(errors.ValidationError, match="MAOF_STAGE_MAX_INPUT_BYTES") as caught:
        check_input_sizes(workflow, workflow_input)
    assert caught.value.details[0]["field"] == "workflow.stages.0.input"


def test_an_interpolated_value_under_the_cap_only_as_compact_utf8_is_too_large(input_cap):
    """700 items of "é": 3.5 KB as compact UTF-8 JSON, but 9 KB as sent: inserted into text,
    the list is written with ", " between items and \\u00e9 for each é, and each of its
    quotes and backslashes is escaped again inside the string."""
    template = {"text": "items: ${workflow.input.items}"}
    workflow_input = {"items": ["é"] * 700}
    compact = json.dumps(workflow_input, ensure_ascii=False, separators=(",", ":"))
    assert len(compact.encode("utf-8")) < input_cap
    with pytest.raises(InputTooLarge, match="MAOF_STAGE_MAX_INPUT_BYTES"):
        check_input_size(template, workflow_input, {})
    with pytest.raises(InputTooLarge):
        check_input_size(template, workflow_input, None)  # at submission too


@pytest.fixture
def measured(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every value and piece of text the size check serialises, in order."""
    sizes: list[int] = []

    def recorded(measure: Any) -> Any:
        def wrapper(value: Any) -> int:
            sizes.append(measure(value))
            return sizes[-1]

        return wrapper

    monkeypatch.setattr(references, "_sent_size", recorded(references._sent_size))
    monkeypatch.setattr(references, "_escaped_size", recorded(references._escaped_size))
    return sizes


def spellings(expression: str) -> list[str]:
    """`${expression}` written 1296 ways, by whitespace `parse` strips."""
    blanks = [" ", "\t", "\n", "\r", "\x0b", "\x0c"]
    return ["${" + a + b + expression + c + d + "}" for a, b, c, d in product(blanks, repeat=4)]


def test_a_value_is_measured_once_however_its_references_are_spelled(measured):
    """The memo was keyed by the reference as written: 1296 spellings of one reference
    serialised its value 1296 times (7776 of a 480 KB value took seconds of CPU)."""
    big = "x" * 10_000
    workflow_input = {"big": big, "items": ["a", big]}
    zeros = [f"${{workflow.input.items.{'0' * n}1}}" for n in range(50)]  # all items[1]
    template = {
        "whole": [*spellings("workflow.input.big"), *zeros],
        "text": [f"<{spelling}>" for spelling in spellings("workflow.input.big")],
    }
    sent = json.dumps(
        resolve(template, workflow_input, {}), ensure_ascii=False, separators=(",", ":")
    )
    assert expanded_size(template, workflow_input, {}) == len(sent.encode("utf-8"))
    assert len([size for size in measured if size >= len(big)]) == 2  # whole, and as text


def test_a_submission_measures_the_workflow_input_once_for_all_its_stages(measured):
    """Each stage's check measured the workflow input afresh: 50 first stages sent it and
    50 referencing it serialised a 1 MB input 100 times, seconds of API CPU for one
    submission."""
    big = "x" * 10_000
    stages = [{"id": f"s{i}", "name": "S", "agentCapability": "c"} for i in range(50)]
    stages += [
        {"id": f"r{i}", "name": "R", "agentCapability": "c", "input": "${workflow.input.big}"}
        for i in range(50)
    ]
    workflow = WorkflowDefinition.model_validate({"name": "w", "stages": stages})
    check_input_sizes(workflow, {"big": big})
    assert len([size for size in measured if size >= len(big)]) == 2  # the input, and big


@pytest.mark.parametrize("where", ["workflow input at submission", "stage output at dispatch"])
def test_the_size_check_stops_measuring_once_past_the_cap(input_cap, measured, where):
    """The size check added up the whole template before comparing it with the cap: a
    template far over it (here 1000 values of 1 KB, about 250 times the cap) was measured
    to the end, at submission before any limit and again by the worker."""
    values = {f"v{i}": str(i).ljust(1000, "x") for i in range(1000)}  # 1000 distinct values
    if where == "workflow input at submission":
        workflow_input, outputs = values, None
        template = [f"${{workflow.input.v{i}}}" for i in range(1000)]
    else:
        workflow_input, outputs = None, {"a": values}
        template = [f"${{a.output.v{i}}}" for i in range(1000)]
    with pytest.raises(InputTooLarge, match="MAOF_STAGE_MAX_INPUT_BYTES"):
        check_input_size(template, workflow_input, outputs)
    assert sum(measured) <= input_cap + len(json.dumps(values["v0"]))  # the cap and one value


def test_text_far_over_the_cap_is_measured_only_up_to_the_cap(input_cap, measured):
    template = {"text": ["y" * 1000] * 1000}
    with pytest.raises(InputTooLarge):
        check_input_size(template, None, None)
    assert sum(measured) <= input_cap + 1000
