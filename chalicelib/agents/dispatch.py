"""Calling an agent: the MAOF agent protocol over HTTP, or the built-in mock.

Request: `POST <endpoint>` with `Authorization: Bearer <agent token>`,
`Idempotency-Key: <runId>:<stageId>:<attempt>` and the JSON body
`{workflowRunId, stageId, capability, input, context: {workflowName, previousStages, deadlineMs}}`.
Answer: `{"status": "success", "output": ...}` or
`{"status": "error", "code", "message", "retryable"}`.

Every failure becomes an AgentCallFailed that says whether a retry may help
(RETRYABLE below is the table the README documents).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import urllib3

from chalicelib.agents.mock import MockAgentFailure, call_mock_agent
from chalicelib.agents.network import check_endpoint_allowed
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
    return get_settings().mock_agents or urlparse(endpoint).scheme == "mock"


@functools.lru_cache(maxsize=1)
def _pool() -> urllib3.PoolManager:
    return urllib3.PoolManager(num_pools=50, maxsize=10, retries=False)


def call_agent(endpoint: str, token: str, agent_id: str, task: AgentTask) -> Any:
    """The agent's output for `task`, or AgentCallFailed."""
    if is_mock(endpoint):
        try:
            return call_mock_agent(agent_id, task.capability, task.input)
        except MockAgentFailure as exc:
            raise AgentCallFailed(str(exc), retryable=True, code="MOCK_FAILURE") from None
    check_endpoint_allowed(endpoint)
    return _post(endpoint, token, task)


@contextmanager
def _transport_errors(task: AgentTask) -> Iterator[None]:
    """Timeouts and connection failures, while sending or reading, as retryable failures."""
    try:
        yield
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
        response = _pool().request(
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
            preload_content=False,
            redirect=False,
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
