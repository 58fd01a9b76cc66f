"""Workflow files: YAML or JSON, either a workflow `{name, stages, timeoutMs?}` or a whole
execute body `{workflow, input?, callback?}`, read into the body `POST /workflows/execute` takes."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import yaml

EXECUTE_KEYS = {"workflow", "input", "callback"}


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
            return json.loads(text)
        loaded = yaml.safe_load(text)
        return json.loads(json.dumps(loaded, default=_jsonable))
    except (ValueError, TypeError, yaml.YAMLError) as exc:
        raise WorkflowFileError(f"{name} is not valid {_kind(name, json_only)}: {exc}") from None


def _kind(name: str, json_only: bool) -> str:
    return "JSON" if json_only or name.endswith(".json") else "YAML"


def read_execute_body(path: Path) -> dict[str, Any]:
    """The execute body a workflow file means."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise WorkflowFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    document = parse_document(text, str(path))
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


def read_input(value: str, stdin_text: str | None = None) -> Any:
    """`--input`: a file (JSON or YAML), `-` for standard input (JSON), or inline JSON."""
    if value == "-":
        return parse_document(stdin_text or "", "standard input", json_only=True)
    path = Path(value)
    if path.is_file():
        try:
            return parse_document(path.read_text(encoding="utf-8"), str(path))
        except OSError as exc:
            raise WorkflowFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return json.loads(value)
    except ValueError:
        raise WorkflowFileError(
            f"--input {value!r} is neither a file nor valid JSON (quote strings: '\"text\"')"
        ) from None
