"""Calling an agent: the MAOF agent protocol over HTTP, or the built-in mock.

Request: `POST <endpoint>` with `Authorization: Bearer <agent token>`,
`Idempotency-Key: <runId>:<stageId>:<attempt>` and the JSON body
`{workflowRunId, stageId, capability, input, context: {workflowName, previousStages, deadlineMs}}`.
Answer: `{"status": "success", "output": ...}` or
`{"status": "error", "code", "message", "retryable"}`.

Every failure becomes an AgentCallFailed that says whether a retry may help
(RETRYABLE below is the table the README documents). The call goes through the SSRF guard
(`network.pinned_request`): a refused endpoint or a redirect fails the stage at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import urllib3

from chalicelib.agents.mock import (
    MOCK_AGENTS_DISABLED,
    MockAgentFailure,
    call_mock_agent,
    is_mock_endpoint,
    mock_agents_enabled,
)
from chalicelib.agents.network import EndpointNotAllowed, EndpointUnresolvable, pinned_request
from chalicelib.config import get_settings

# HTTP statuses worth another attempt; any other non-2xx is final.
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class AgentCallFailed(Exception):
    """The agent produced no output. `retryable` says whether trying again may help."""

    def __init__(self, message: str, *, retryable: bool, code: str = "AGENT_ERROR") -> None:
        super().__init__(message)
        self.retryable = retryable
        self.code = code


@dataclass(frozen=True)
class AgentTask:
    """Everything an agent is told about one attempt of one stage."""

    run_ref: str
    stage_id: str
    attempt: int
    capability: str
    input: Any
    workflow_name: str
    previous_stages: list[dict[str, Any]] = field(default_factory=list)
    timeout_ms: int = 30_000

    @property
    def idempotency_key(self) -> str:
        return f"{self.run_ref}:{self.stage_id}:{self.attempt}"

    def body(self) -> dict[str, Any]:
        return {
            "workflowRunId": self.run_ref,
            "stageId": self.stage_id,
            "capability": self.capability,
            "input": self.input,
            "context": {
                "workflowName": self.workflow_name,
                "previousStages": self.previous_stages,
                "deadlineMs": self.timeout_ms,
            },
        }


def is_mock(endpoint: str) -> bool:
    """Whether the built-in mock serves `endpoint`: every agent when MAOF_MOCK_AGENTS=true,
    `mock://` ones where mock agents are enabled."""
    return get_settings().mock_agents or (is_mock_endpoint(endpoint) and mock_agents_enabled())


def call_agent(endpoint: str, token: str, agent_id: str, task: AgentTask) -> Any:
    """The agent's output for `task`, or AgentCallFailed."""
    if is_mock(endpoint):
        try:
            return call_mock_agent(agent_id, task.capability, task.input)
        except MockAgentFailure as exc:
            raise AgentCallFailed(str(exc), retryable=True, code="MOCK_FAILURE") from None
    if is_mock_endpoint(endpoint):
        raise AgentCallFailed(
            f"MOCK_AGENTS_DISABLED: {MOCK_AGENTS_DISABLED}",
            retryable=False,
            code="MOCK_AGENTS_DISABLED",
        )
    return _post(endpoint, token, task)


@contextmanager
def _transport_errors(task: AgentTask) -> Iterator[None]:
    """The guard's refusals as final failures; an unresolvable name, timeouts and connection
    failures, while sending or reading, as retryable ones."""
    try:
        yield
    except EndpointUnresolvable:
        raise AgentCallFailed(
            "could not reach the agent (its host name does not resolve)",
            retryable=True,
            code="UNREACHABLE",
        ) from None
    except EndpointNotAllowed as exc:
        raise AgentCallFailed(
            f"ENDPOINT_NOT_ALLOWED: the agent endpoint is not allowed: {exc}",
            retryable=False,
            code="ENDPOINT_NOT_ALLOWED",
        ) from None
    except (TimeoutError, urllib3.exceptions.TimeoutError):
        raise AgentCallFailed(
            f"no answer within {task.timeout_ms} ms", retryable=True, code="TIMEOUT"
        ) from None
    except urllib3.exceptions.HTTPError as exc:
        raise AgentCallFailed(
            f"could not reach the agent ({type(exc).__name__})", retryable=True, code="UNREACHABLE"
        ) from None


def _post(endpoint: str, token: str, task: AgentTask) -> Any:
    limit = get_settings().agent_max_response_bytes
    seconds = task.timeout_ms / 1000
    with _transport_errors(task):
        response = pinned_request(
            "POST",
            endpoint,
            body=json.dumps(task.body()).encode("utf-8"),
            headers={
                "Authorization": f"Bearer {token}",
                "Idempotency-Key": task.idempotency_key,
                "Content-Type": "application/json",
                "Accept": "application/json",
                "User-Agent": "maof-agent-dispatch/1",
            },
            timeout=urllib3.Timeout(connect=min(seconds, 5.0), read=seconds),
        )
        try:
            raw = response.read(limit + 1, decode_content=True)
        finally:
            response.release_conn()
    if len(raw) > limit:
        raise AgentCallFailed(
            f"the answer exceeds {limit} bytes", retryable=False, code="RESPONSE_TOO_LARGE"
        )
    return interpret(response.status, raw)


def interpret(status: int, raw: bytes) -> Any:
    """The output of an agent's HTTP answer, or AgentCallFailed (see the README's table)."""
    try:
        document = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        document = None
    if 300 <= status < 400:
        # Following it would reach an address the guard never checked.
        raise AgentCallFailed(
            f"REDIRECT_REFUSED: the agent answered HTTP {status}, a redirect; "
            "MAOF never follows redirects",
            retryable=False,
            code="REDIRECT_REFUSED",
        )
    if not 200 <= status < 300:
        message = f"HTTP {status}"
        if isinstance(document, dict) and isinstance(document.get("message"), str):
            message += f": {document['message'][:500]}"
        raise AgentCallFailed(
            message, retryable=status in RETRYABLE_STATUSES, code=f"HTTP_{status}"
        )
    if not isinstance(document, dict) or document.get("status") not in ("success", "error"):
        raise AgentCallFailed(
            "the agent's answer is not a MAOF protocol response",
            retryable=True,
            code="INVALID_RESPONSE",
        )
    if document["status"] == "error":
        code = str(document.get("code") or "AGENT_ERROR")[:100]
        message = str(document.get("message") or "the agent reported an error")[:1000]
        raise AgentCallFailed(
            f"{code}: {message}", retryable=document.get("retryable") is True, code=code
        )
    if "output" not in document:
        raise AgentCallFailed(
            "a success answer without output", retryable=True, code="INVALID_RESPONSE"
        )
    return document["output"]
