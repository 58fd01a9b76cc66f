"""The workflow definition a user submits, and its validation as a DAG."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from chalicelib.agents.network import EndpointNotAllowed, check_endpoint_allowed
from chalicelib.config import get_settings
from chalicelib.core import errors
from chalicelib.core.api import ApiModel, OptionalJsonInteger
from chalicelib.core.capabilities import Capability
from chalicelib.core.references import (
    InputTooLarge,
    MalformedReference,
    Measured,
    check_forms,
    check_input_size,
    check_sent_size,
    references_in,
)

STAGE_ID_PATTERN = r"^[A-Za-z0-9_-]+$"


class StageConfig(ApiModel):
    """Per-stage dispatch settings; anything unset falls back to the MAOF_AGENT_* defaults."""

    timeout_ms: OptionalJsonInteger = Field(default=None, ge=100, le=900_000)
    retries: OptionalJsonInteger = Field(default=None, ge=0, le=10)
    backoff_ms: OptionalJsonInteger = Field(default=None, ge=0, le=3_600_000)
    max_backoff_ms: OptionalJsonInteger = Field(default=None, ge=0, le=86_400_000)


class StageDefinition(ApiModel):
    id: str = Field(min_length=1, max_length=100, pattern=STAGE_ID_PATTERN)
    name: str = Field(min_length=1, max_length=255)
    agent_capability: Capability
    dependencies: list[str] = Field(default_factory=list, max_length=100)
    input: Any = None
    config: StageConfig | None = None


class WorkflowDefinition(ApiModel):
    name: str = Field(min_length=1, max_length=255)
    stages: list[StageDefinition] = Field(min_length=1, max_length=100)
    # The run fails if it has not ended this long after it was submitted (or retried).
    timeout_ms: OptionalJsonInteger = Field(default=None, ge=100, le=24 * 3600 * 1000)


class Callback(ApiModel):
    """Where MAOF POSTs the run's outcome when it ends, signed with `secret`."""

    url: str = Field(min_length=1, max_length=2048)
    secret: str = Field(min_length=16, max_length=1024, repr=False)

    @field_validator("url")
    @classmethod
    def _allowed(cls, value: str) -> str:
        try:
            check_endpoint_allowed(value)  # the same SSRF guard as agent endpoints
        except EndpointNotAllowed as exc:
            raise ValueError(f"the callback URL is not allowed: {exc}") from None
        return value


class ExecuteRequest(ApiModel):
    workflow: WorkflowDefinition
    input: Any = None
    callback: Callback | None = None


def _invalid(index: int, field: str, message: str) -> errors.ValidationError:
    return errors.ValidationError(
        message, [{"field": f"workflow.stages.{index}.{field}", "message": message}]
    )


def check_dag(workflow: WorkflowDefinition) -> None:
    """Unique ids, known dependencies, no self-dependency, no cycle, every `${...}` in an
    input of one of the two reference forms, references to ancestors.

    Every message names the offending stage.
    """
    index_of: dict[str, int] = {}
    for index, stage in enumerate(workflow.stages):
        if stage.id in index_of:
            raise _invalid(index, "id", f"Stage '{stage.id}' is defined more than once")
        index_of[stage.id] = index
    for index, stage in enumerate(workflow.stages):
        for dependency in stage.dependencies:
            if dependency == stage.id:
                raise _invalid(index, "dependencies", f"Stage '{stage.id}' depends on itself")
            if dependency not in index_of:
                raise _invalid(
                    index,
                    "dependencies",
                    f"Stage '{stage.id}' depends on unknown stage '{dependency}'",
                )
        if len(set(stage.dependencies)) != len(stage.dependencies):
            raise _invalid(index, "dependencies", f"Stage '{stage.id}' lists a dependency twice")
    cycle = _find_cycle(workflow)
    if cycle:
        path = " -> ".join(cycle)
        raise _invalid(index_of[cycle[0]], "dependencies", f"Stages form a cycle: {path}")
    ancestors = _ancestors(workflow)
    for index, stage in enumerate(workflow.stages):
        try:
            check_forms(stage.input)
        except MalformedReference as exc:
            field = ".".join(("input", *exc.path))
            raise _invalid(index, field, f"Stage '{stage.id}': {exc}") from None
        for reference in references_in(stage.input):
            if reference.stage_id is None:
                continue
            if reference.stage_id not in ancestors[stage.id]:
                raise _invalid(
                    index,
                    "input",
                    f"Stage '{stage.id}' references '{reference.text}', but stage "
                    f"'{reference.stage_id}' is not one of its dependencies",
                )


def _find_cycle(workflow: WorkflowDefinition) -> list[str] | None:
    deps = {stage.id: stage.dependencies for stage in workflow.stages}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in deps[node]:
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for stage in workflow.stages:
        if stage.id not in state:
            found = visit(stage.id)
            if found:
                return found
    return None


def _ancestors(workflow: WorkflowDefinition) -> dict[str, set[str]]:
    deps = {stage.id: stage.dependencies for stage in workflow.stages}
    memo: dict[str, set[str]] = {}

    def of(node: str) -> set[str]:
        if node not in memo:
            found: set[str] = set()
            for dep in deps[node]:
                found.add(dep)
                found |= of(dep)
            memo[node] = found
        return memo[node]

    return {stage.id: of(stage.id) for stage in workflow.stages}


def needed_outputs(stage: StageDefinition) -> list[str]:
    """The stages whose outputs `stage` reads: those its input references, or (without an
    input) its dependencies, whose outputs it receives by default."""
    if stage.input is None:
        return list(stage.dependencies)
    return sorted({r.stage_id for r in references_in(stage.input) if r.stage_id is not None})


def check_input_sizes(workflow: WorkflowDefinition, workflow_input: Any) -> None:
    """400 for a stage whose input already expands past MAOF_STAGE_MAX_INPUT_BYTES from the
    workflow input alone (stage outputs, unknown yet, are checked when the stage runs).
    Each value is measured once, however many stages it reaches: the work grows with the
    input and the templates, not with their product."""
    measured: Measured = {}
    for index, stage in enumerate(workflow.stages):
        if stage.input is None and stage.dependencies:
            continue  # its dependencies' outputs, checked when it runs
        try:
            if stage.input is None:  # the workflow input, sent as it is
                check_sent_size(workflow_input, measured)
            else:
                check_input_size(stage.input, workflow_input, None, measured)
        except InputTooLarge as exc:
            raise _invalid(index, "input", f"Stage '{stage.id}': {exc}") from None


def check_timeouts(workflow: WorkflowDefinition) -> None:
    """400 for a stage timeout longer than the run_stage function can wait for."""
    longest = get_settings().max_stage_timeout_ms
    for index, stage in enumerate(workflow.stages):
        if stage.config and stage.config.timeout_ms and stage.config.timeout_ms > longest:
            raise _invalid(
                index,
                "config.timeoutMs",
                f"Stage '{stage.id}': timeoutMs may be at most {longest} ms (the run_stage "
                "function's timeout, MAOF_RUN_STAGE_TIMEOUT_SECONDS, less a margin)",
            )
