"""Workflow files: YAML or JSON, either a workflow `{name, stages, timeoutMs?}` or a whole
execute body `{workflow, input?, callback?}`, read into the body `POST /workflows/execute` takes."""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Any

import yaml

EXECUTE_KEYS = {"workflow", "input", "callback"}
# No MAOF API takes a body nested deeper (MAOF_MAX_JSON_DEPTH is at most 512), and json
# encodes a body for sending with one recursion per level: a deeper one would fail there.
MAX_DEPTH = 512


class WorkflowFileError(ValueError):
    """A workflow file or input that cannot be read; the message says which and why."""


def _jsonable(value: Any) -> Any:
    # YAML reads `2024-01-01` as a date; JSON has none: send it as the text it was.
    if isinstance(value, datetime.date | datetime.datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


def parse_document(text: str, name: str, *, json_only: bool = False) -> Any:
    """JSON (a `.json` name) or YAML (anything else; YAML also reads most JSON)."""
    try:
        if json_only or name.endswith(".json"):
            document = json.loads(text)
        else:
            document = json.loads(json.dumps(yaml.safe_load(text), default=_jsonable))
    except (ValueError, TypeError, yaml.YAMLError) as exc:
        raise WorkflowFileError(f"{name} is not valid {_kind(name, json_only)}: {exc}") from None
    except RecursionError:  # both parsers recurse once per level of nesting
        raise _too_deep(name) from None
    return finite(document, name)


def _too_deep(name: str) -> WorkflowFileError:
    return WorkflowFileError(
        f"{name} nests lists or objects too deeply (more than {MAX_DEPTH} levels)"
    )


def finite(document: Any, name: str) -> Any:
    """`document`, unless a number in it is NaN or infinite (Python's json reads `NaN`,
    `Infinity` and `1e999`, YAML `.nan` and `.inf`, but JSON has no such number) or it
    nests deeper than MAX_DEPTH: either way the request could not be sent."""
    pending: list[tuple[Any, str, int]] = [(document, "", 0)]
    while pending:  # not recursive: as deep as json.loads goes, with no stack to spare
        value, where, depth = pending.pop()
        if isinstance(value, float) and not math.isfinite(value):
            number = "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
            raise WorkflowFileError(
                f"{name}: {where.lstrip('.') or 'the value'} is {number}, "
                "and JSON has no NaN or infinite numbers"
            )
        if depth > MAX_DEPTH:
            raise _too_deep(name)
        # Pushed last first, so the first one in the document is the one named.
        if isinstance(value, dict):
            items = [(item, f"{where}.{key}", depth + 1) for key, item in value.items()]
            pending.extend(reversed(items))
        elif isinstance(value, list):
            items = [(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
            pending.extend(reversed(items))
    return document


def _kind(name: str, json_only: bool) -> str:
    return "JSON" if json_only or name.endswith(".json") else "YAML"


def read_execute_body(path: Path) -> dict[str, Any]:
    """The execute body a workflow file means."""
    document = parse_document(read_text(path), str(path))
    if not isinstance(document, dict):
        raise WorkflowFileError(f"{path} must hold an object, not {type(document).__name__}")
    if "workflow" in document:
        unknown = set(document) - EXECUTE_KEYS
        if unknown:
            raise WorkflowFileError(
                f"{path}: an execute body has only workflow, input and callback; "
                f"not {', '.join(sorted(unknown))}"
            )
        return dict(document)
    if "stages" in document:
        return {"workflow": document}
    raise WorkflowFileError(
        f"{path} is neither a workflow ({{name, stages}}) nor an execute body ({{workflow, input}})"
    )


def read_text(path: Path) -> str:
    """A workflow or input file's text, which must be UTF-8 (as JSON is, and YAML mostly),
    without the byte order mark some editors start UTF-8 with (json refuses one; YAML
    skipped it already)."""
    try:
        # Not "utf-8-sig": its errors count offsets from after the mark, not in the file.
        return path.read_text(encoding="utf-8").removeprefix("\ufeff")
    except OSError as exc:
        raise WorkflowFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise WorkflowFileError(
            f"{path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
            f"{exc.start}); save it as UTF-8"
        ) from None


def read_input(value: str, stdin_text: str | None = None) -> Any:
    """`--input`: a file (JSON or YAML), `-` for standard input (JSON), or inline JSON.

    A value that starts as JSON text does ({, [ or ") is read as JSON before it is taken
    for a file name (an inline object longer than a file name may be is no file)."""
    if value == "-":
        return parse_document(stdin_text or "", "standard input", json_only=True)
    path = Path(value)
    inline = value.lstrip()[:1] in ("{", "[", '"')
    if not inline and _is_file(path):
        return parse_document(read_text(path), str(path))
    try:
        document = json.loads(value)
    except RecursionError:
        raise _too_deep("--input") from None
    except ValueError:
        if inline and _is_file(path):  # a file named as JSON starts: `[draft].yaml`
            return parse_document(read_text(path), str(path))
        raise WorkflowFileError(
            f"--input {value!r} is neither a file nor valid JSON (quote strings: '\"text\"')"
        ) from None
    return finite(document, "--input")


def _is_file(path: Path) -> bool:
    """Whether `path` names a file; False too for a name the system refuses (too long)."""
    try:
        return path.is_file()
    except OSError:
        return False
