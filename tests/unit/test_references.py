"""References in stage inputs: whole values keep their JSON type, longer strings interpolate,
and anything unresolvable fails with the reference as written."""

from __future__ import annotations

import json

import pytest

from chalicelib.core.references import (
    Reference,
    UnresolvableReference,
    references_in,
    resolve,
)

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
