"""`${workflow.input.<path>}` and `${<stageId>.output.<path>}` references in stage inputs."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from chalicelib.config import get_settings
from chalicelib.core.encoding import stored_size

REFERENCE = re.compile(r"\$\{([^${}]+)\}")
FORMS = "${workflow.input.<path>} or ${<stageId>.output.<path>}"


class UnresolvableReference(Exception):
    """A reference that cannot be resolved; the message says which and why."""


class MalformedReference(UnresolvableReference):
    """A `${...}` of neither form, which no data could ever resolve; `path`: the keys and
    list indexes from the template's root down to the string that holds it."""

    def __init__(self, message: str, path: tuple[str, ...]) -> None:
        super().__init__(message)
        self.path = path


class InputTooLarge(Exception):
    """A stage input that would expand past MAOF_STAGE_MAX_INPUT_BYTES."""


@dataclass(frozen=True)
class Reference:
    text: str  # as written, e.g. "${step-1.output.points.0}"
    stage_id: str | None  # None for workflow input
    path: tuple[str, ...]


def parse(expression: str) -> Reference:
    text = "${" + expression + "}"
    parts = expression.strip().split(".")
    if len(parts) >= 2 and parts[0] == "workflow" and parts[1] == "input":
        return Reference(text, None, tuple(parts[2:]))
    if len(parts) >= 2 and parts[1] == "output":
        return Reference(text, parts[0], tuple(parts[2:]))
    raise UnresolvableReference(f"Unknown reference {text}: use {FORMS}")


def check_forms(template: Any) -> None:
    """MalformedReference for the first `${...}` in `template` (in document order) that
    `parse` refuses, so `resolve` would fail on it whatever the data. Every string `resolve`
    reads is looked at: values at any depth of lists and objects; keys are never resolved.
    Iterative: a hostile depth costs no stack."""
    stack: list[tuple[tuple[str, ...], Any]] = [((), template)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            for match in REFERENCE.finditer(item):
                if _parse_or_none(match.group(1)) is None:
                    raise MalformedReference(
                        f"Malformed reference {match.group(0)}: use {FORMS}. Every ${{...}} "
                        "in a stage input is a reference, and there is no escape: text that "
                        "must hold one can come from the workflow input, by reference",
                        path,
                    )
        elif isinstance(item, list):
            stack.extend(((*path, str(i)), x) for i, x in reversed(list(enumerate(item))))
        elif isinstance(item, dict):
            stack.extend(((*path, str(k)), v) for k, v in reversed(list(item.items())))


def references_in(value: Any) -> Iterator[Reference]:
    """Every well-formed reference anywhere in `value` (strings, lists, objects); the
    others are check_forms's to refuse."""
    if isinstance(value, str):
        for match in REFERENCE.finditer(value):
            try:
                yield parse(match.group(1))
            except UnresolvableReference:
                continue
    elif isinstance(value, list):
        for item in value:
            yield from references_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from references_in(item)


def _index(key: str) -> int | None:
    """The list index `key` spells, if any. ASCII digits only ("²".isdigit() is true but
    int("²") raises ValueError); and no int() of over 4,300 digits (a ValueError too): an
    index that long is past the end of any list."""
    if not (key.isascii() and key.isdigit()):
        return None
    digits = key.lstrip("0") or "0"
    return int(digits) if len(digits) <= 18 else None


def _lookup(reference: Reference, workflow_input: Any, outputs: Mapping[str, Any]) -> Any:
    if reference.stage_id is None:
        current = workflow_input
    elif reference.stage_id in outputs:
        current = outputs[reference.stage_id]
    else:
        raise UnresolvableReference(
            f"Unknown reference {reference.text}: stage '{reference.stage_id}' has no output"
        )
    for depth, key in enumerate(reference.path):
        index = _index(key) if isinstance(current, list) else None
        if isinstance(current, dict) and key in current:
            current = current[key]
        elif index is not None and index < len(current):
            current = current[index]
        else:
            walked = ".".join(reference.path[:depth]) or "(root)"
            raise UnresolvableReference(
                f"Unknown reference {reference.text}: no '{key}' under {walked}"
            )
    return current


def resolve(template: Any, workflow_input: Any, outputs: Mapping[str, Any]) -> Any:
    """`template` with every reference replaced.

    A string that is exactly one reference takes the referenced value with its JSON
    type; references inside longer strings are interpolated as text.
    """
    if isinstance(template, str):
        whole = REFERENCE.fullmatch(template)
        if whole:
            return _lookup(parse(whole.group(1)), workflow_input, outputs)

        def text(match: re.Match[str]) -> str:
            return _as_text(_lookup(parse(match.group(1)), workflow_input, outputs))

        return REFERENCE.sub(text, template)
    if isinstance(template, list):
        return [resolve(item, workflow_input, outputs) for item in template]
    if isinstance(template, dict):
        return {key: resolve(item, workflow_input, outputs) for key, item in template.items()}
    return template


def _as_text(value: Any) -> str:
    """A value as `resolve` interpolates it into a longer string."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


# Sizes of values already measured, keyed by the value itself (its id and whether it is
# sent whole or inserted into text), which whitespace around a reference or leading zeros
# in a list index spell any number of ways; each entry holds its value, so its id is not
# reused. Shared by the checks of one submission, a value is measured once for them all.
Measured = dict[tuple[int, bool], tuple[Any, int]]


def expanded_size(
    template: Any,
    workflow_input: Any,
    outputs: Mapping[str, Any] | None,
    cap: int | None = None,
    measured: Measured | None = None,
) -> int:
    """How many bytes `resolve` would produce, exactly as the agent receives them: JSON as
    chalicelib/agents/dispatch.py serialises the request body (compact, UTF-8),
    interpolated text with its quotes and backslashes escaped; a number as it is stored
    (stored_size: the stage is resolved from stored values, 1e308 read back as 309 digits).

    Computed without building the input: a value referenced many times, however the
    references are spelled, is measured once and counted each time. With `outputs` None
    (at submission), stage outputs count nothing, as do references that do not resolve
    (`resolve` fails on those). With `cap`, InputTooLarge as soon as the count passes it:
    the work done is bounded by the cap plus one value, however large the template.
    `measured` carries sizes over from other templates of the same values."""
    total = 0
    memo: Measured = {} if measured is None else measured

    def count(size: int) -> None:
        nonlocal total
        total += size
        if cap is not None and total > cap:
            raise _too_large(cap)

    def value_size(reference: Reference, *, whole: bool) -> int:
        if reference.stage_id is not None and outputs is None:
            return 0
        try:
            value = _lookup(reference, workflow_input, outputs or {})
        except UnresolvableReference:
            return 0
        return _size_of(value, whole, memo)

    def text(item: str) -> None:
        # JSON escapes each character on its own, so the parts of a string add up.
        count(2)  # its quotes
        end = 0
        for match in REFERENCE.finditer(item):
            count(_escaped_size(item[end : match.start()]))
            reference = _parse_or_none(match.group(1))
            if reference is None:
                count(_escaped_size(match.group(0)))
            else:
                count(value_size(reference, whole=False))
            end = match.end()
        count(_escaped_size(item[end:]))

    def measure(item: Any) -> None:
        if isinstance(item, str):
            whole = REFERENCE.fullmatch(item)
            reference = _parse_or_none(whole.group(1)) if whole else None
            if reference is not None:
                count(value_size(reference, whole=True))
            else:
                text(item)
        elif isinstance(item, list):
            count(2 + _separators(item))
            for x in item:
                measure(x)
        elif isinstance(item, dict):
            count(2 + _separators(item))
            for k, v in item.items():
                count(_sent_size(str(k)) + 1)
                measure(v)
        else:
            count(_sent_size(item))

    measure(template)
    return total


def _parse_or_none(expression: str) -> Reference | None:
    try:
        return parse(expression)
    except UnresolvableReference:
        return None


def _too_large(cap: int) -> InputTooLarge:
    return InputTooLarge(
        f"the stage input would expand to more than MAOF_STAGE_MAX_INPUT_BYTES ({cap}) "
        "bytes of JSON as sent to the agent"
    )


def _size_of(value: Any, whole: bool, measured: Measured) -> int:
    key = (id(value), whole)
    if key not in measured:
        size = _sent_size(value) if whole else _interpolated_size(value)
        measured[key] = (value, size)
    return measured[key][1]


def check_sent_size(value: Any, measured: Measured | None = None) -> None:
    """InputTooLarge when `value`, sent as it is (a stage without `input` gets the workflow
    input or its dependencies' outputs), is more than MAOF_STAGE_MAX_INPUT_BYTES."""
    cap = get_settings().stage_max_input_bytes
    if _size_of(value, True, {} if measured is None else measured) > cap:
        raise _too_large(cap)


def _sent_size(value: Any) -> int:
    """Bytes of `value` as dispatch sends it (compact UTF-8 JSON), its numbers as stored."""
    return stored_size(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


def _interpolated_size(value: Any) -> int:
    """Bytes of `value` as `resolve` interpolates it, inside a JSON string as dispatch sends
    it, its numbers as stored."""
    text = _as_text(value)
    if isinstance(value, str):
        return _escaped_size(text)
    # Numbers, written as digits, need no escape: they grow the text by what they grow.
    return _escaped_size(text) + stored_size(text) - len(text)  # _as_text's JSON is ASCII


def _escaped_size(text: str) -> int:
    """Bytes of `text` inside a JSON string as dispatch sends it, without the quotes."""
    return len(json.dumps(text, ensure_ascii=False).encode("utf-8")) - 2


def _separators(items: list[Any] | dict[Any, Any]) -> int:
    return max(len(items) - 1, 0)  # "," between items


def check_input_size(
    template: Any,
    workflow_input: Any,
    outputs: Mapping[str, Any] | None,
    measured: Measured | None = None,
) -> None:
    """InputTooLarge when `template` would expand past MAOF_STAGE_MAX_INPUT_BYTES, found
    without measuring more than the cap plus one value (none `measured` already)."""
    cap = get_settings().stage_max_input_bytes
    expanded_size(template, workflow_input, outputs, cap, measured)
