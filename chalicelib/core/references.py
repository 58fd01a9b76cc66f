"""`${workflow.input.<path>}` and `${<stageId>.output.<path>}` references in stage inputs."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from chalicelib.config import get_settings

REFERENCE = re.compile(r"\$\{([^${}]+)\}")


class UnresolvableReference(Exception):
    """A reference that cannot be resolved; the message says which and why."""


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
    raise UnresolvableReference(
        f"Unknown reference {text}: use ${{workflow.input.<path>}} or ${{<stageId>.output.<path>}}"
    )


def references_in(value: Any) -> Iterator[Reference]:
    """Every well-formed reference anywhere in `value` (strings, lists, objects)."""
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


def _is_index(key: str) -> bool:
    # ASCII only: "²".isdigit() is true but int("²") raises ValueError.
    return key.isascii() and key.isdigit()


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
        if isinstance(current, dict) and key in current:
            current = current[key]
        elif isinstance(current, list) and _is_index(key) and int(key) < len(current):
            current = current[int(key)]
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
        whole = REFERENCE.fullmatch(template.strip())
        if whole:
            return _lookup(parse(whole.group(1)), workflow_input, outputs)

        def text(match: re.Match[str]) -> str:
            value = _lookup(parse(match.group(1)), workflow_input, outputs)
            return value if isinstance(value, str) else json.dumps(value, sort_keys=True)

        return REFERENCE.sub(text, template)
    if isinstance(template, list):
        return [resolve(item, workflow_input, outputs) for item in template]
    if isinstance(template, dict):
        return {key: resolve(item, workflow_input, outputs) for key, item in template.items()}
    return template


def expanded_size(template: Any, workflow_input: Any, outputs: Mapping[str, Any] | None) -> int:
    """How many bytes of JSON `resolve` would produce (to within a few bytes of quoting),
    computed without building it: a value referenced many times is measured once and
    counted each time. With `outputs` None (at submission), stage outputs count nothing,
    as do references that do not resolve."""
    measured: dict[str, int] = {}

    def value_size(reference: Reference) -> int:
        if reference.text not in measured:
            if reference.stage_id is not None and outputs is None:
                measured[reference.text] = 0
            else:
                try:
                    value = _lookup(reference, workflow_input, outputs or {})
                except UnresolvableReference:
                    measured[reference.text] = 0
                else:
                    measured[reference.text] = _json_size(value)
        return measured[reference.text]

    def size(item: Any) -> int:
        if isinstance(item, str):
            whole = REFERENCE.fullmatch(item.strip())
            reference = _parse_or_none(whole.group(1)) if whole else None
            if reference is not None:
                return value_size(reference)
            total = _json_size(item)
            for match in REFERENCE.finditer(item):
                reference = _parse_or_none(match.group(1))
                if reference is not None:
                    total += value_size(reference) - len(match.group(0))
            return total
        if isinstance(item, list):
            return 2 + sum(size(x) + 1 for x in item)
        if isinstance(item, dict):
            return 2 + sum(_json_size(str(k)) + 1 + size(v) + 1 for k, v in item.items())
        return _json_size(item)

    return size(template)


def _parse_or_none(expression: str) -> Reference | None:
    try:
        return parse(expression)
    except UnresolvableReference:
        return None


def _json_size(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def check_input_size(template: Any, workflow_input: Any, outputs: Mapping[str, Any] | None) -> None:
    """InputTooLarge when `template` would expand past MAOF_STAGE_MAX_INPUT_BYTES."""
    cap = get_settings().stage_max_input_bytes
    size = expanded_size(template, workflow_input, outputs)
    if size > cap:
        raise InputTooLarge(
            f"the stage input would expand to {size} bytes, more than "
            f"MAOF_STAGE_MAX_INPUT_BYTES ({cap})"
        )
