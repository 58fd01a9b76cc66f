"""A tiny MAOF agent server (standard library only): the protocol, so an agent is one function.

    POST <path>          Authorization: Bearer <token>, Idempotency-Key: <run>:<stage>:<attempt>
                         {workflowRunId, stageId, capability, input, context}
                      -> {"status": "success", "output": ...}
                       | {"status": "error", "code", "message", "retryable"}
    GET  <path>/health -> {"status": "healthy"}

Answers are remembered by Idempotency-Key, so a retried delivery of the same attempt
gets the same answer without doing the work twice, even one that arrives while the first
is still being worked on (MAOF retries under the same key after a timeout): it waits for
that answer. An agent function that raises anything but TaskError answers 500, which MAOF
retries; nothing is remembered for it.
"""

from __future__ import annotations

import hmac
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit


class TaskError(Exception):
    """Raised by an agent function to answer with a protocol error."""

    def __init__(self, code: str, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable


Agent = Callable[[str, Any, dict[str, Any]], Any]  # (capability, input, context) -> output


class AgentServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, path: str, token: str, agent: Agent) -> None:
        self.path = path.rstrip("/") or "/"
        self.token = token
        self.agent = agent
        self.answers: OrderedDict[str, bytes] = OrderedDict()  # the last KEPT, by key
        self.working: dict[str, threading.Event] = {}  # set once the key's work is over
        self.lock = threading.Lock()
        super().__init__((host, port), _Handler)

    KEPT = 10_000

    def answer_once(self, key: str, work: Callable[[], bytes]) -> bytes:
        """The answer to the attempt `key`: remembered; or, while another request works on
        it, that request's answer once it has one; else `work()`'s, remembered. If that
        other request's work raised, this one works it out itself."""
        while True:
            with self.lock:
                if (answer := self.answers.get(key)) is not None:
                    return answer
                if (other := self.working.get(key)) is None:
                    done = self.working[key] = threading.Event()
                    break
            other.wait()
        try:
            answer = work()
            with self.lock:
                self.answers[key] = answer
                while len(self.answers) > self.KEPT:
                    self.answers.popitem(last=False)
            return answer
        finally:
            with self.lock:
                del self.working[key]
            done.set()


class _Handler(BaseHTTPRequestHandler):
    server: AgentServer
    protocol_version = "HTTP/1.1"
    # http.server writes the headers and the body apart: without TCP_NODELAY, Nagle's
    # algorithm holds the body for the caller's delayed ACK, ~40 ms on every keep-alive
    # request after the first (MAOF keeps connections to agents open).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # quiet by default
        pass

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _route(self) -> str:
        """The request's path without its query: an endpoint may carry one (MAOF's health
        probe keeps it too)."""
        return urlsplit(self.path).path.rstrip("/")

    def do_GET(self) -> None:
        if self._route() == f"{self.server.path}/health".replace("//", "/"):
            self._send(200, b'{"status":"healthy"}')
        else:
            self._send(404, b'{"status":"error","code":"NOT_FOUND","message":"no such path"}')

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self._route() != self.server.path.rstrip("/"):
            self._send(404, b'{"status":"error","code":"NOT_FOUND","message":"no such path"}')
            return
        supplied = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(supplied.encode(), self.server.token.encode()):
            self._send(401, _error("UNAUTHORIZED", "bad agent token", False))
            return
        try:
            task = json.loads(raw)
            capability, data = str(task["capability"]), task.get("input")
            context = dict(task.get("context") or {})
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            self._send(400, _error("BAD_REQUEST", f"malformed task: {exc}", False))
            return

        def work() -> bytes:
            try:
                output = self.server.agent(capability, data, context)
            except TaskError as exc:
                return _error(exc.code, str(exc), exc.retryable)
            return json.dumps({"status": "success", "output": output}).encode()

        key = self.headers.get("Idempotency-Key") or ""
        try:
            answer = self.server.answer_once(key, work) if key else work()
        except Exception as exc:  # a bug in the agent: MAOF retries a 500
            self._send(500, _error("AGENT_FAILED", type(exc).__name__, True))
            return
        self._send(200, answer)


def _error(code: str, message: str, retryable: bool) -> bytes:
    return json.dumps(
        {"status": "error", "code": code, "message": message, "retryable": retryable}
    ).encode()


def run_until_interrupted(server: AgentServer, banner: str) -> None:
    """Print `banner` and serve until Ctrl-C (for the agents' command lines)."""
    print(banner, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()


def serve(agent: Agent, host: str, port: int, path: str, token: str) -> AgentServer:
    """Start serving in a background thread; returns the server (call .shutdown() to stop)."""
    server = AgentServer(host, port, path, token, agent)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def find_text(value: Any) -> str:
    """The text to work on in a stage input: a `text`-like field, or every string joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        for key in ("text", "summary", "translation", "content"):
            if isinstance(value.get(key), str):
                return str(value[key])
        return " ".join(t for t in (find_text(v) for v in value.values()) if t)
    if isinstance(value, list):
        return " ".join(t for t in (find_text(v) for v in value) if t)
    return ""
