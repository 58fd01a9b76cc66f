"""Calling an agent: the MAOF agent protocol over HTTP, or the built-in mock.

Request: `POST <endpoint>` with `Authorization: Bearer <agent token>`,
`Idempotency-Key: <runId>:<stageId>:<attempt>` and the JSON body
`{workflowRunId, stageId, capability, input, context: {workflowName, previousStages, deadlineMs}}`.
Answer: `{"status": "success", "output": ...}` or
`{"status": "error", "code", "message", "retryable"}`.

Every failure becomes an AgentCallFailed whose `failure` says what it means for the stage
(engine/policy.py; the table in docs/protocol.md). The call goes through the SSRF guard
(`network.pinned_request`) and ends by its deadline, connect to last byte, however the
agent trickles; a success is parsed strictly (an error is read for its message alone):
what JSON, Postgres's JSONB or the audit's hash refuses (NaN, Infinity, a number past a
double, U+0000, lone surrogates, nesting past MAOF_AGENT_MAX_OUTPUT_DEPTH, an output past
MAOF_STAGE_MAX_OUTPUT_BYTES) is INVALID_OUTPUT, an error of that agent.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import urllib3

from chalicelib.agents.failure import Failure
from chalicelib.agents.mock import (
    MOCK_AGENTS_DISABLED,
    MockAgentFailure,
    call_mock_agent,
    is_mock_endpoint,
    mock_agents_enabled,
)
from chalicelib.agents.network import (
    EndpointNotAllowed,
    EndpointUnresolvable,
    ResolverBusy,
    pinned_request,
    read_by,
    time_left,
)
from chalicelib.config import get_settings
from chalicelib.core.encoding import Unstorable, dumps, encodes, stored_size, unstorable

# HTTP statuses worth another attempt; any other non-2xx is final.
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class AgentCallFailed(Exception):
    """The agent produced no output; `failure` says what that means for the stage."""

    def __init__(
        self,
        message: str,
        *,
        failure: Failure,
        code: str = "AGENT_ERROR",
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(message)
        self.failure = failure
        self.code = code
        self.retry_after_ms = retry_after_ms  # the agent's Retry-After, for a retryable status

    @property
    def retryable(self) -> bool:
        """Whether the same agent may be asked again."""
        return self.failure in (Failure.AGENT_RETRYABLE, Failure.IN_DOUBT)


@dataclass(frozen=True)
class AgentOutput:
    """An agent's output, and its JSON text as it will be stored (checked storable)."""

    value: Any
    text: str


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
    # time.monotonic() by which the call must be over (the stage's timeout, cut short by
    # the invocation's own remaining time); None: timeout_ms from the start of the call.
    deadline: float | None = None
    # What set `deadline` before timeout_ms ran out ("the run's deadline"), if anything: a
    # TIMEOUT then names the time the call was given, not a timeout never applied.
    cut_short_by: str | None = None

    def call_deadline(self) -> float:
        return (
            self.deadline
            if self.deadline is not None
            else time.monotonic() + self.timeout_ms / 1000
        )

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
                "deadlineMs": self.time_left_ms(),
            },
        }

    def time_left_ms(self) -> int:
        """What the agent has to answer in: timeoutMs, less when the run's deadline or the
        invocation's time comes first (the deadline MAOF cuts the call at)."""
        if self.deadline is None:
            return self.timeout_ms
        left = int((self.deadline - time.monotonic()) * 1000)
        return max(0, min(self.timeout_ms, left))


def is_mock(endpoint: str) -> bool:
    """Whether the built-in mock serves `endpoint`: every agent when MAOF_MOCK_AGENTS=true,
    `mock://` ones where mock agents are enabled."""
    return get_settings().mock_agents or (is_mock_endpoint(endpoint) and mock_agents_enabled())


def call_agent(endpoint: str, token: str, agent_id: str, task: AgentTask) -> AgentOutput:
    """The agent's output for `task`, or AgentCallFailed."""
    if is_mock(endpoint):
        try:
            return checked_output(call_mock_agent(agent_id, task.capability, task.input))
        except MockAgentFailure as exc:
            raise AgentCallFailed(
                str(exc), failure=Failure.AGENT_RETRYABLE, code="MOCK_FAILURE"
            ) from None
    if is_mock_endpoint(endpoint):
        raise AgentCallFailed(
            f"MOCK_AGENTS_DISABLED: {MOCK_AGENTS_DISABLED}",
            failure=Failure.AGENT_UNUSABLE,
            code="MOCK_AGENTS_DISABLED",
        )
    return _post(endpoint, token, task)


@contextmanager
def _transport_errors(task: AgentTask, given_ms: int) -> Iterator[None]:
    """The guard's refusals as an unusable agent; an unresolvable name, the deadline and
    connection failures, while sending or reading, as in doubt (the agent may be working)."""
    try:
        yield
    except EndpointUnresolvable:
        raise AgentCallFailed(
            "UNREACHABLE: could not reach the agent (its host name does not resolve)",
            failure=Failure.IN_DOUBT,
            code="UNREACHABLE",
        ) from None
    except EndpointNotAllowed as exc:
        raise AgentCallFailed(
            f"ENDPOINT_NOT_ALLOWED: the agent endpoint is not allowed: {exc}",
            failure=Failure.AGENT_UNUSABLE,
            code="ENDPOINT_NOT_ALLOWED",
        ) from None
    except ResolverBusy:
        raise AgentCallFailed(
            "RESOLVER_BUSY: no lookup of the agent's host name could begin in time (this "
            "service's lookups were all taken); nothing was sent",
            failure=Failure.IN_DOUBT,
            code="RESOLVER_BUSY",
        ) from None
    except (TimeoutError, urllib3.exceptions.TimeoutError):
        within = f"{task.timeout_ms} ms"
        if task.cut_short_by:
            within = f"{given_ms} ms ({task.cut_short_by}; the stage's timeout is {within})"
        raise AgentCallFailed(
            f"TIMEOUT: no complete answer within {within}",
            failure=Failure.IN_DOUBT,
            code="TIMEOUT",
        ) from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        if broken := _broken_http(exc):
            raise AgentCallFailed(
                f"INVALID_RESPONSE: the agent's answer is not valid HTTP ({broken})",
                failure=Failure.AGENT_RETRYABLE,
                code="INVALID_RESPONSE",
            ) from None
        raise AgentCallFailed(
            f"UNREACHABLE: could not reach the agent ({type(exc).__name__})",
            failure=Failure.IN_DOUBT,
            code="UNREACHABLE",
        ) from None


def _broken_http(exc: Exception) -> str | None:
    """What http.client refused in an answer that did arrive (more than 100 headers, a
    header line past 64 KiB, a status line that is not HTTP, a body that does not inflate
    as its Content-Encoding says), in words fit to store; None for a connection that
    failed (refused, reset, closed before or in the middle of an answer: the agent may
    still be working)."""
    if isinstance(exc, urllib3.exceptions.DecodeError):
        return "its body does not decode as its Content-Encoding says"
    wrapped = isinstance(exc, urllib3.exceptions.ProtocolError) and len(exc.args) > 1
    cause = exc.args[1] if wrapped else exc
    if not isinstance(cause, http.client.HTTPException) or isinstance(
        cause, ConnectionError | http.client.IncompleteRead
    ):
        return None  # RemoteDisconnected is a ConnectionError too
    return _printable(f"{type(cause).__name__}: {cause}", 200)


def _request_headers(token: str, task: AgentTask) -> dict[str, str]:
    headers = {
        "Authorization": f"Bearer {token}",
        "Idempotency-Key": task.idempotency_key,
        "Content-Type": "application/json",
        "Accept": "application/json",
        "User-Agent": "maof-agent-dispatch/1",
    }
    for name, value in headers.items():
        # http.client refuses these mid-request, or fails to encode them (beyond Latin-1),
        # naming the character and where it is: say why instead, with nothing of the token
        # (one set before registration checked it): no request could ever be made with it.
        if any(ch in value for ch in "\r\n\x00") or not (
            value.isprintable() and encodes(value, "latin-1")
        ):
            raise AgentCallFailed(
                f"INVALID_REQUEST_HEADER: the {name} header for this agent holds characters "
                "HTTP refuses (check its authToken)",
                failure=Failure.AGENT_UNUSABLE,
                code="INVALID_REQUEST_HEADER",
            )
    return headers


def request_body(task: AgentTask) -> bytes:
    """The task as sent: compact UTF-8 JSON (what MAOF_STAGE_MAX_INPUT_BYTES measures)."""
    return json.dumps(task.body(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _post(endpoint: str, token: str, task: AgentTask) -> AgentOutput:
    """POST the task and read the answer, all of it by the task's deadline: each socket
    operation waits at most for what is left of it, so a trickled answer ends on time."""
    limit = get_settings().agent_max_response_bytes
    headers = _request_headers(token, task)
    deadline = task.call_deadline()
    with _transport_errors(task, task.time_left_ms()):
        left = time_left(deadline)
        response = pinned_request(
            "POST",
            endpoint,
            body=request_body(task),
            headers=headers,
            timeout=urllib3.Timeout(connect=min(left, 5.0), read=left),
            deadline=deadline,
        )
        try:
            raw = read_by(response, deadline, limit)
        finally:
            response.release_conn()
    if len(raw) > limit:
        raise AgentCallFailed(
            f"RESPONSE_TOO_LARGE: the answer exceeds {limit} bytes",
            failure=Failure.AGENT_UNUSABLE,
            code="RESPONSE_TOO_LARGE",
        )
    return interpret(response.status, raw, response.headers.get("Retry-After"))


class InvalidOutput(ValueError):
    """A value JSON or JSONB cannot hold; the message says what."""


def _refuse_constant(name: str) -> Any:
    raise InvalidOutput(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidOutput(f"{text} is out of the range of a JSON number")
    return value


# An integer of more digits is past a double (1.8e308) for sure: refused unread, as
# check_storable would refuse it (past 4300 digits int() raises a ValueError, read as "not
# JSON": a retryable INVALID_RESPONSE).
_MAX_INT_DIGITS = 309


def _bounded_int(text: str) -> int:
    if len(text) - text.startswith("-") > _MAX_INT_DIGITS:
        raise InvalidOutput("an integer is out of the range of a JSON number")
    return int(text)


def strict_loads(raw: bytes) -> Any:
    """JSON as RFC 8259 has it: no NaN, no Infinity, no number that overflows to one."""
    try:
        return json.loads(
            raw,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            parse_int=_bounded_int,
        )
    except RecursionError:
        raise InvalidOutput("nested too deeply") from None


def check_storable(value: Any, max_depth: int) -> None:
    """InvalidOutput unless Postgres's JSONB can store `value` and the audit trail hash it
    (no U+0000, no lone surrogates, no number beyond a double, nesting within
    `max_depth`)."""
    found = unstorable(value, max_depth)
    if found is None:
        return
    kind, item = found
    if kind is Unstorable.NUL:
        raise InvalidOutput("a string holds U+0000, which Postgres cannot store")
    if kind is Unstorable.SURROGATE:
        raise InvalidOutput("a string holds a lone surrogate, which is not Unicode")
    if kind is Unstorable.DEPTH:
        raise InvalidOutput(f"nested more than {max_depth} levels deep")
    if isinstance(item, float):
        raise InvalidOutput(f"{item} is not a JSON number")
    raise InvalidOutput("an integer is out of the range of a JSON number")


def _lenient_loads(raw: bytes) -> Any:
    """An error answer's body as JSON, NaN and all (its message is all that is used), or
    None when it is none."""
    try:
        return json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def checked_output(value: Any) -> AgentOutput:
    """`value` with its JSON text, if it can be stored within the caps; else INVALID_OUTPUT."""
    settings = get_settings()
    try:
        check_storable(value, settings.agent_max_output_depth)
        text = dumps(value)
    except (InvalidOutput, ValueError, TypeError) as exc:
        raise _invalid_output(str(exc)) from None
    cap = settings.stage_max_output_bytes
    if stored_size(text) > cap:  # as stored and served: 1e308 comes back as 309 digits
        raise _invalid_output(f"the output exceeds MAOF_STAGE_MAX_OUTPUT_BYTES ({cap} bytes)")
    return AgentOutput(value, text)


def _invalid_output(reason: str) -> AgentCallFailed:
    return AgentCallFailed(
        f"INVALID_OUTPUT: {reason}", failure=Failure.AGENT_UNUSABLE, code="INVALID_OUTPUT"
    )


def retry_after_ms(header: str | None) -> int | None:
    """A Retry-After header (seconds, or an HTTP date) in milliseconds from now; None when
    absent or unreadable. How long is left to the caller to cap."""
    if not header:
        return None
    header = header.strip()
    if header.isascii() and header.isdigit():
        return int(header[:12]) * 1000
    try:
        when = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        when = when.replace(tzinfo=UTC)
    return max(0, int((when - datetime.now(UTC)).total_seconds() * 1000))


def interpret(status: int, raw: bytes, retry_after: str | None = None) -> AgentOutput:
    """The output of an agent's HTTP answer, or AgentCallFailed (docs/protocol.md's table);
    `retry_after`: the answer's Retry-After header, heeded on a retryable status. The
    status decides first: only a success's output must be storable, an error's body is
    read for its message alone (a NaN in it made a 503 unusable)."""
    if 300 <= status < 400:
        # Following it would reach an address the guard never checked.
        raise AgentCallFailed(
            f"REDIRECT_REFUSED: the agent answered HTTP {status}, a redirect; "
            "MAOF never follows redirects",
            failure=Failure.AGENT_UNUSABLE,
            code="REDIRECT_REFUSED",
        )
    if not 200 <= status < 300:
        document = _lenient_loads(raw)
        message = f"HTTP {status}"
        if isinstance(document, dict) and isinstance(document.get("message"), str):
            message += f": {_printable(document['message'], 500)}"
        if status in RETRYABLE_STATUSES:
            raise AgentCallFailed(
                message,
                failure=Failure.AGENT_RETRYABLE,
                code=f"HTTP_{status}",
                retry_after_ms=retry_after_ms(retry_after),
            )
        raise AgentCallFailed(message, failure=Failure.AGENT_FINAL, code=f"HTTP_{status}")
    try:
        document = strict_loads(raw) if raw else None
    except InvalidOutput as exc:
        document = _lenient_loads(raw)
        if not isinstance(document, dict) or document.get("status") != "error":
            raise _invalid_output(str(exc)) from None
    except (ValueError, UnicodeDecodeError):
        document = None
    if not isinstance(document, dict) or document.get("status") not in ("success", "error"):
        raise AgentCallFailed(
            "INVALID_RESPONSE: the agent's answer is not a MAOF protocol response",
            failure=Failure.AGENT_RETRYABLE,
            code="INVALID_RESPONSE",
        )
    if document["status"] == "error":
        code = _printable(str(document.get("code") or "AGENT_ERROR"), 100)
        message = _printable(str(document.get("message") or "the agent reported an error"), 1000)
        failure = (
            Failure.AGENT_RETRYABLE if document.get("retryable") is True else Failure.AGENT_FINAL
        )
        raise AgentCallFailed(f"{code}: {message}", failure=failure, code=code)
    if "output" not in document:
        raise AgentCallFailed(
            "INVALID_RESPONSE: a success answer without output",
            failure=Failure.AGENT_RETRYABLE,
            code="INVALID_RESPONSE",
        )
    return checked_output(document["output"])


CUT_MARK = "..."


def _printable(text: str, limit: int) -> str:
    """An agent's words for our error message and the database: storable, and at most
    `limit` characters and `limit` bytes as the API serves them (ASCII JSON: an emoji takes
    12), cut on a character's boundary and ending in CUT_MARK when cut. Each retry's audit
    entry, the stage's and the run's error message repeat them: counted in characters
    alone, 1,000 emoji made 12 KB of every such answer."""
    clean = (
        "".join(ch if ch.isprintable() and ch != "\x00" else "?" for ch in text[: limit + 1])
        .encode("utf-8", "replace")
        .decode("utf-8")
    )
    if len(clean) <= limit and _served_bytes(clean) <= limit:
        return clean
    budget, kept = limit - len(CUT_MARK), 0
    for count, ch in enumerate(clean):
        budget -= _served_bytes(ch)
        if budget < 0 or count == limit - len(CUT_MARK):
            break
        kept = count + 1
    return clean[:kept] + CUT_MARK


def _served_bytes(text: str) -> int:
    return len(json.dumps(text)) - 2  # without the string's quotes
