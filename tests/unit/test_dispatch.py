"""How an agent's HTTP answer maps to an output or to a failure kind (engine/policy.py),
and what strict parsing refuses: anything JSON or Postgres's JSONB cannot hold."""

from __future__ import annotations

import contextlib
import email.utils
import gzip
import json
import socket
import threading
import time
import tracemalloc
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from chalicelib.agents import dispatch, network, secrets
from chalicelib.agents.dispatch import AgentCallFailed, AgentTask, call_agent, interpret
from chalicelib.agents.failure import Failure
from chalicelib.agents.selection import AgentChoice
from chalicelib.config import get_settings
from tests.support.raw_server import answering

RETRYABLE, FINAL, UNUSABLE = Failure.AGENT_RETRYABLE, Failure.AGENT_FINAL, Failure.AGENT_UNUSABLE


def answer(document: object) -> bytes:
    return json.dumps(document).encode()


def test_success_answer_gives_its_output_and_the_json_stored():
    output = interpret(200, answer({"status": "success", "output": {"a": 1}}))
    assert (output.value, output.text) == ({"a": 1}, '{"a":1}')


def test_success_output_may_be_any_json_value():
    assert interpret(200, answer({"status": "success", "output": None})).value is None


@pytest.mark.parametrize(
    ("status", "body", "failure"),
    [
        (
            200,
            answer({"status": "error", "code": "X", "message": "m", "retryable": True}),
            RETRYABLE,
        ),
        (200, answer({"status": "error", "code": "X", "message": "m", "retryable": False}), FINAL),
        (200, answer({"status": "error", "code": "X", "message": "m"}), FINAL),
        (200, b"<html>not json</html>", RETRYABLE),
        (200, b'{"status": "success", "output": ', RETRYABLE),
        (200, answer({"output": 1}), RETRYABLE),
        (200, answer({"status": "success"}), RETRYABLE),
        (408, b"", RETRYABLE),
        (429, b"", RETRYABLE),
        (500, b"", RETRYABLE),
        (502, b"", RETRYABLE),
        (503, answer({"message": "busy"}), RETRYABLE),
        (504, b"", RETRYABLE),
        (400, b"", FINAL),
        (401, b"", FINAL),
        (403, b"", FINAL),
        (404, b"", FINAL),
        (422, b"", FINAL),
        (302, b"", UNUSABLE),
    ],
)
def test_failures_map_to_the_documented_table(status, body, failure):
    with pytest.raises(AgentCallFailed) as failed:
        interpret(status, body)
    assert failed.value.failure is failure
    assert failed.value.retryable is (failure is RETRYABLE)


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b'{"status": "success", "output": NaN}', "NaN"),
        (b'{"status": "success", "output": {"x": Infinity}}', "Infinity"),
        (b'{"status": "success", "output": -Infinity}', "Infinity"),
        (b'{"status": "success", "output": 1e400}', "1e400"),
        # An integer literal past a double: JSONB stores it, the audit's hash cannot.
        (b'{"status": "success", "output": {"n": 1' + b"0" * 400 + b"}}", "integer"),
        (b'{"status": "success", "output": [-' + b"9" * 320 + b"]}", "integer"),
        # Past Python's int-digit limit: was "not JSON", retried on the same agent.
        (b'{"status": "success", "output": ' + b"1" * 5000 + b"}", "integer"),
        (b'{"status": "success", "output": [-' + b"9" * 5000 + b"]}", "integer"),
        (b'{"status": "success", "output": "a\\u0000b"}', "U+0000"),
        (b'{"status": "success", "output": {"a\\u0000": 1}}', "U+0000"),
        (b'{"status": "success", "output": "\\ud800"}', "surrogate"),
        (b'{"status": "success", "output": {"\\udfff": 1}}', "surrogate"),
        (b'{"status": "success", "output": ' + deep(200).encode() + b"}", "levels"),
        (b'{"status": "success", "output": ' + deep(100_000).encode() + b"}", "deep"),
    ],
)
def test_output_that_json_or_jsonb_refuses_is_invalid_output_of_that_agent(raw, says):
    """Refused as the agent's error (unusable: the next agent's turn), not stored and then
    failing the audit's hash as an error of ours (retried on the same agent, then failed
    as an internal error, as an integer past a double was)."""
    with pytest.raises(AgentCallFailed) as failed:
        interpret(200, raw)
    assert failed.value.code == "INVALID_OUTPUT"
    assert failed.value.failure is UNUSABLE
    assert says in str(failed.value)


@pytest.mark.parametrize(
    ("status", "body", "failure", "says"),
    [
        (503, b'{"message": "overloaded", "load": NaN}', RETRYABLE, "HTTP 503: overloaded"),
        (404, b'{"message": "no such task", "n": 1e400}', FINAL, "HTTP 404: no such task"),
        (500, b'{"message": "m", "trace": ' + deep(100_000).encode() + b"}", RETRYABLE, "HTTP 500"),
        (
            200,
            b'{"status": "error", "code": "BUSY", "message": "m", "retryable": true, "cpu": NaN}',
            RETRYABLE,
            "BUSY: m",
        ),
        (200, b'{"status": "error", "code": "NO", "message": "m", "n": -Infinity}', FINAL, "NO: m"),
    ],
    ids=["503-nan", "404-1e400", "500-deep", "error-retryable-nan", "error-final-inf"],
)
def test_an_error_answer_follows_its_status_whatever_else_its_body_holds(
    status, body, failure, says
):
    """Only a success's output must be storable: an error's body was parsed as strictly,
    and a NaN beside its message made a 503 (Retry-After and all) an unusable agent."""
    with pytest.raises(AgentCallFailed) as failed:
        interpret(status, body, "1")
    assert failed.value.failure is failure
    assert str(failed.value).startswith(says)
    assert failed.value.retry_after_ms == (1000 if status >= 500 else None)


def test_output_over_the_stage_output_cap_is_invalid_output():
    cap = get_settings().stage_max_output_bytes
    with pytest.raises(AgentCallFailed, match="MAOF_STAGE_MAX_OUTPUT_BYTES") as failed:
        interpret(200, answer({"status": "success", "output": "x" * cap}))
    assert failed.value.code == "INVALID_OUTPUT"


def test_an_output_under_the_cap_only_as_written_with_exponents_is_invalid_output():
    """1e308 is 6 bytes as the agent writes it and 309 digits as JSONB stores and serves
    it: an output of them passed the cap at a 45th of the size it was stored at."""
    cap = get_settings().stage_max_output_bytes
    output = [1e308] * (cap // 250)
    assert len(answer({"status": "success", "output": output})) < cap // 20
    with pytest.raises(AgentCallFailed, match="MAOF_STAGE_MAX_OUTPUT_BYTES") as failed:
        interpret(200, answer({"status": "success", "output": output}))
    assert failed.value.code == "INVALID_OUTPUT"


def test_an_agents_error_text_is_made_storable():
    raw = b'{"status": "error", "code": "E\\u0000", "message": "bad \\ud800 \\u0000 x"}'
    with pytest.raises(AgentCallFailed) as failed:
        interpret(200, raw)
    text = str(failed.value)
    assert "\x00" not in text
    text.encode("utf-8")  # no lone surrogate left


def test_error_message_carries_the_agents_code_and_message():
    with pytest.raises(AgentCallFailed, match="BAD_INPUT: no text"):
        interpret(200, answer({"status": "error", "code": "BAD_INPUT", "message": "no text"}))


@pytest.mark.parametrize("token", ["secret-\u20ac-token", "line\nbreak", "nul\x00"])
def test_a_token_http_cannot_carry_makes_the_agent_unusable_naming_nothing_of_it(token):
    """One stored before registration refused it: http.client's UnicodeEncodeError named
    the character and its place in the token, in an error other users of a shared agent
    read, and the stage went round as an internal error."""
    task = AgentTask("wfr-1", "s1", 1, "c", {}, "wf")
    with pytest.raises(AgentCallFailed) as failed:
        dispatch._request_headers(token, task)
    assert failed.value.code == "INVALID_REQUEST_HEADER"
    assert failed.value.failure is Failure.AGENT_UNUSABLE
    assert "\u20ac" not in str(failed.value) and "position" not in str(failed.value)


def test_a_token_no_configured_key_decrypts_makes_the_agent_unusable():
    """Its key dropped before it was re-encrypted: the InvalidToken was an internal error,
    retried on the same agent until the stage failed, never falling back."""
    lost = secrets._fernet_of("l" * 40).encrypt(b"the-agent-token").decode()
    agent = AgentChoice("5f0c6b1e-0000-4000-8000-000000000000", "a", "http://a.test", lost, 1)
    with pytest.raises(
        AgentCallFailed, match="decrypted with any key; register it again"
    ) as failed:
        _ = agent.token
    assert failed.value.code == "UNREADABLE_TOKEN"
    assert failed.value.failure is Failure.AGENT_UNUSABLE


def test_task_body_and_idempotency_key_follow_the_protocol():
    task = AgentTask("wfr-1", "s1", 3, "summarization", {"t": 1}, "wf", [{"stageId": "s0"}], 5000)
    assert task.idempotency_key == "wfr-1:s1:3"
    assert task.body() == {
        "workflowRunId": "wfr-1",
        "stageId": "s1",
        "capability": "summarization",
        "input": {"t": 1},
        "context": {
            "workflowName": "wf",
            "previousStages": [{"stageId": "s0"}],
            "deadlineMs": 5000,
        },
    }


def test_the_agent_is_told_the_time_left_when_a_deadline_comes_before_its_timeout():
    soon = AgentTask("wfr-1", "s1", 1, "c", {}, "wf", [], 30_000, time.monotonic() + 1.5)
    assert 1000 < soon.body()["context"]["deadlineMs"] <= 1500
    later = AgentTask("wfr-1", "s1", 1, "c", {}, "wf", [], 5000, time.monotonic() + 60)
    assert later.body()["context"]["deadlineMs"] == 5000
    past = AgentTask("wfr-1", "s1", 1, "c", {}, "wf", [], 5000, time.monotonic() - 1)
    assert past.body()["context"]["deadlineMs"] == 0


class _KeepAliveAgent(BaseHTTPRequestHandler):
    """Answers every POST after 50 ms, keeping the connection open (as real agents do)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        task = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(0.05)
        body = answer({"status": "success", "output": {"stage": task["stageId"]}})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_answers_read_in_full_are_kept_when_their_connections_go_back_to_a_full_pool(
    monkeypatch,
):
    # urllib3 hands a connection back to its pool as the last byte is read, and closes it
    # when the pool is full: more calls at once to one agent than the pool keeps.
    monkeypatch.setattr(network, "POOL_MAXSIZE", 1)
    monkeypatch.setattr(network, "_pools", OrderedDict())
    server = ThreadingHTTPServer(("127.0.0.1", 0), _KeepAliveAgent)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/agent"

    def call(index: int) -> Any:
        task = AgentTask("wfr-1", f"s{index}", 1, "c", {}, "wf", timeout_ms=5000)
        return call_agent(url, "tok", "agent", task).value

    try:
        for _ in range(3):
            with ThreadPoolExecutor(8) as pool:
                outputs = list(pool.map(call, range(8)))
            assert outputs == [{"stage": f"s{i}"} for i in range(8)]
    finally:
        server.shutdown()
        server.server_close()


# 200 MB of output, gzipped to about 200 KB.
BOMB = gzip.compress(answer({"status": "success", "output": "a" * 200_000_000}), 9)


class _BombAgent(BaseHTTPRequestHandler):
    """Answers with a gzip bomb, whatever was asked (no Accept-Encoding was sent)."""

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(BOMB)))
        self.end_headers()
        self.wfile.write(BOMB)


def test_a_compressed_answer_is_cut_at_the_size_cap_as_it_is_inflated():
    """The cap (MAOF_AGENT_MAX_RESPONSE_BYTES) counts inflated bytes, and inflating stops
    there: a 200-KB answer that inflates to 200 MB costs the worker about a megabyte
    (urllib3 2.6 or later, pinned in requirements.txt, inflates a read's worth at a time)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _BombAgent)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    task = AgentTask("wfr-1", "s", 1, "c", {}, "wf", timeout_ms=10_000)
    tracemalloc.start()
    try:
        with pytest.raises(AgentCallFailed) as refused:
            call_agent(f"http://127.0.0.1:{server.server_address[1]}/", "tok", "agent", task)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        server.shutdown()
        server.server_close()
    assert (refused.value.code, refused.value.failure) == ("RESPONSE_TOO_LARGE", UNUSABLE)
    assert peak < 20 * get_settings().agent_max_response_bytes, peak


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("3", 3000),
        (" 120 ", 120_000),
        ("9" * 40, 999_999_999_999_000),  # read, not trusted: the policy caps it
        ("-1", None),
        ("1.5", None),
        ("\u0663", None),  # a digit, but not an ASCII one
        ("soon", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0),  # past
    ],
)
def test_retry_after_is_read_as_seconds_or_an_http_date(header, expected):
    assert dispatch.retry_after_ms(header) == expected


def test_a_retry_after_date_in_the_future_is_the_time_until_it():
    when = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 28_000 <= dispatch.retry_after_ms(when) <= 30_000


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("C" * 100, "\U0001f600" * 1000),  # 12 bytes each once served (ASCII JSON)
        ("\U0001f600" * 100, '"' * 1000),  # a quote served escaped: 2 bytes
        ("C" * 500, "x" * 5000),
    ],
    ids=["emoji-message", "emoji-code", "long"],
)
def test_an_agents_error_text_is_cut_to_what_it_takes_once_served(code, message):
    """An agent's code and message are kept to 100 and 1,000 bytes as the API serves them:
    each retry's audit entry and the stage's error message repeat them."""
    body = json.dumps({"status": "error", "code": code, "message": message, "retryable": True})
    with pytest.raises(AgentCallFailed) as refused:
        interpret(200, body.encode())
    kept_code, _, kept_message = str(refused.value).partition(": ")
    assert refused.value.code == kept_code
    assert len(json.dumps(kept_code)) - 2 <= 100
    assert len(json.dumps(kept_message)) - 2 <= 1000
    assert kept_message != message
    for kept, sent in ((kept_code, code), (kept_message, message)):
        cut = dispatch.CUT_MARK
        assert kept == sent or (kept.endswith(cut) and sent.startswith(kept[: -len(cut)]))


def test_an_agents_error_text_within_its_limits_is_kept_whole():
    body = json.dumps({"status": "error", "code": "C" * 100, "message": "é" * 166})
    with pytest.raises(AgentCallFailed) as refused:
        interpret(200, body.encode())
    assert str(refused.value) == "C" * 100 + ": " + "é" * 166  # 996 bytes served


def test_a_retryable_status_carries_its_retry_after_and_a_final_one_none():
    with pytest.raises(AgentCallFailed) as limited:
        interpret(429, b"", "7")
    assert (limited.value.failure, limited.value.retry_after_ms) == (Failure.AGENT_RETRYABLE, 7000)
    with pytest.raises(AgentCallFailed) as refused:
        interpret(403, b"", "7")
    assert (refused.value.failure, refused.value.retry_after_ms) == (Failure.AGENT_FINAL, None)


@pytest.mark.parametrize(
    ("reply", "code", "failure", "says"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n", "INVALID_RESPONSE", RETRYABLE, "not valid HTTP (BadStatus"),
        (
            b"HTTP/1.1 200 OK\r\n" + b"X-Pad: x\r\n" * 101 + b"\r\n",
            "INVALID_RESPONSE",
            RETRYABLE,
            "more than 100 headers",
        ),
        (
            b"HTTP/1.1 200 OK\r\nX-Pad: " + b"x" * 70_000 + b"\r\n\r\n",
            "INVALID_RESPONSE",
            RETRYABLE,
            "not valid HTTP (LineTooLong",
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 5\r\n\r\nhello",
            "INVALID_RESPONSE",
            RETRYABLE,
            "does not decode as its Content-Encoding says",
        ),
        # Closed before any answer, or in the middle of one: the agent may have been
        # working, and was not heard out.
        (b"", "UNREACHABLE", Failure.IN_DOUBT, "could not reach the agent"),
        (
            b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"status"',
            "UNREACHABLE",
            Failure.IN_DOUBT,
            "could not reach the agent",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
            "UNREACHABLE",
            Failure.IN_DOUBT,
            "could not reach the agent",
        ),
    ],
    ids=[
        "not-http",
        "101-headers",
        "long-header-line",
        "not-gzip",
        "closed",
        "cut-body",
        "cut-chunks",
    ],
)
def test_an_answer_http_itself_refuses_names_what_was_wrong(reply, code, failure, says):
    listener, url = answering(reply)
    task = AgentTask("wfr-1", "s", 1, "c", {}, "wf", timeout_ms=5000)
    try:
        with pytest.raises(AgentCallFailed) as refused:
            call_agent(url, "tok", "agent", task)
    finally:
        listener.close()
    assert (refused.value.code, refused.value.failure) == (code, failure), str(refused.value)
    assert says in str(refused.value)
    assert str(refused.value).isprintable()


class _KeepAliveRawAgent:
    """A keep-alive agent written at the socket: the n-th POST it reads (from 0, over
    whichever connection) is answered by `replies(n, task)`, a list of (seconds to wait,
    bytes to send). Records the connection each request came over."""

    def __init__(self, replies: Any) -> None:
        self.replies = replies
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.requests: list[tuple[int, str]] = []  # (connection number, stageId)
        self._lock = threading.Lock()
        self._connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}/agent"

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                with self._lock:
                    self._connections += 1
                    number = self._connections
                threading.Thread(target=self._serve, args=(conn, number), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        reader = conn.makefile("rb")
        with contextlib.suppress(OSError), conn:
            while line := reader.readline():
                headers = {}
                while (header := reader.readline()) not in (b"\r\n", b""):
                    name, _, value = header.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                task = json.loads(reader.read(int(headers["content-length"])))
                with self._lock:
                    index = len(self.requests)
                    self.requests.append((number, task["stageId"]))
                assert line.startswith(b"POST ")
                for wait, data in self.replies(index, task):
                    time.sleep(wait)
                    conn.sendall(data)

    def close(self) -> None:
        self.listener.close()


def _final(task: dict[str, Any]) -> bytes:
    body = answer({"status": "success", "output": {"stage": task["stageId"]}})
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body


def _call(url: str, stage: str) -> Any:
    task = AgentTask("wfr-1", stage, 1, "c", {}, "wf", timeout_ms=5000)
    return call_agent(url, "tok", "agent", task).value


@pytest.fixture
def fresh_pools(monkeypatch):
    """Pools of this test's own, one connection each: a second call reuses the first's."""
    monkeypatch.setattr(network, "POOL_MAXSIZE", 1)
    monkeypatch.setattr(network, "_pools", OrderedDict())


def test_interim_1xx_answers_are_skipped_and_each_call_reads_its_own_final_answer(
    fresh_pools,
):
    """RFC 9110 15.2: a 103 Early Hints (or 102 Processing) comes before the final answer.
    Taken for the answer, it failed its call, and the final answer, left on the pooled
    connection, was read by the next call over it: perhaps another user's run."""
    interim = [
        b"HTTP/1.1 102 Processing\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
    ]

    def replies(index: int, task: dict[str, Any]) -> list[tuple[float, bytes]]:
        return [(0, interim[index % 2]), (0.05, interim[index % 2]), (0.3, _final(task))]

    agent = _KeepAliveRawAgent(replies)
    try:
        assert [_call(agent.url, f"s{i}") for i in range(3)] == [
            {"stage": "s0"},
            {"stage": "s1"},
            {"stage": "s2"},
        ]
    finally:
        agent.close()
    assert [connection for connection, _ in agent.requests] == [1, 1, 1]  # kept alive


def test_a_101_answer_fails_its_call_and_its_connection_carries_no_other(fresh_pools):
    """Never asked for, a 101 is no interim answer: the call fails on it, and what the
    agent sends after it is read by no other call."""

    def replies(index: int, task: dict[str, Any]) -> list[tuple[float, bytes]]:
        if index == 0:
            return [(0, b"HTTP/1.1 101 Switching Protocols\r\n\r\n"), (0.5, _final(task))]
        return [(0, _final(task))]

    agent = _KeepAliveRawAgent(replies)
    try:
        with pytest.raises(AgentCallFailed, match="HTTP 101"):
            _call(agent.url, "s0")
        assert _call(agent.url, "s1") == {"stage": "s1"}
    finally:
        agent.close()
    assert agent.requests == [(1, "s0"), (2, "s1")]


def test_an_answer_over_the_size_cap_leaves_nothing_for_the_next_call_to_read(fresh_pools):
    """Read to the cap, its connection went back to the pool with the rest of the body on
    it (arriving late): the next call read that as its answer, an INVALID_RESPONSE retried
    under a new key, and the agent did its work twice."""
    limit = get_settings().agent_max_response_bytes
    head = b'{"status":"success","output":"'
    fill = b"x" * (limit + 1 - len(head))
    tail = b"x" * 1000 + b'"}'

    def replies(index: int, task: dict[str, Any]) -> list[tuple[float, bytes]]:
        if index == 0:
            length = len(head) + len(fill) + len(tail)
            return [
                (0, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % length + head + fill),
                (0.5, tail),
            ]
        return [(0, _final(task))]

    agent = _KeepAliveRawAgent(replies)
    try:
        with pytest.raises(AgentCallFailed) as refused:
            _call(agent.url, "s0")
        assert refused.value.code == "RESPONSE_TOO_LARGE"
        assert _call(agent.url, "s1") == {"stage": "s1"}
    finally:
        agent.close()
    assert agent.requests == [(1, "s0"), (2, "s1")]  # asked once, on a connection of its own


def test_an_output_just_within_the_output_cap_is_accepted_in_its_envelope(fresh_pools):
    """The response cap (MAOF_AGENT_MAX_RESPONSE_BYTES) counts the envelope too: it was as
    large as the output cap, and such an output was refused as RESPONSE_TOO_LARGE."""
    output = "x" * (get_settings().stage_max_output_bytes - 10)

    def replies(index: int, task: dict[str, Any]) -> list[tuple[float, bytes]]:
        body = answer({"status": "success", "output": output})
        return [(0, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)]

    agent = _KeepAliveRawAgent(replies)
    try:
        assert _call(agent.url, "s0") == output
    finally:
        agent.close()


def test_a_call_cut_short_of_its_timeout_says_how_long_it_was_given():
    """The run's deadline or the invocation's time ended the call before timeoutMs: the
    TIMEOUT names the time the call had, not a timeout never applied."""
    listener = socket.create_server(("127.0.0.1", 0))  # connects, never answers
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
    cut = AgentTask(
        "wfr-1", "s", 1, "c", {}, "wf", [], 45_000, time.monotonic() + 0.5,
        cut_short_by="the time left to this invocation",
    )  # fmt: skip
    try:
        with pytest.raises(AgentCallFailed) as failed:
            call_agent(url, "tok", "agent", cut)
    finally:
        listener.close()
    message = str(failed.value)
    assert failed.value.code == "TIMEOUT", message
    given = int(message.split("within ")[1].split(" ms")[0])
    assert 0 < given <= 500, message
    assert "the time left to this invocation; the stage's timeout is 45000 ms" in message
