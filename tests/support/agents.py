"""A scriptable agent server for tests: each POST takes the next scripted behaviour.

Besides well-behaved answers it can be hostile: raw bytes of any kind (NaN, U+0000, lone
surrogates, deep nesting, broken JSON), a huge answer, a body trickled a byte at a time, a
connection it never answers. Each call records when it started and ended on the agent's
side, and how it ended (answered, or the client hung up first).
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Call:
    headers: dict[str, str]
    body: dict[str, Any]
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None  # when the agent finished answering or saw the client leave
    outcome: str = "open"  # open | answered | client-closed | agent-stopped

    @property
    def seconds(self) -> float | None:
        return None if self.ended is None else self.ended - self.started


@dataclass
class Seen:
    """Any request that reached the server: health probes too."""

    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Behaviour:
    kind: str  # ok | sleep | gated | status | error | garbage | redirect | raw | large | trickle(-head) | hang
    value: Any = None
    output: Any = None


def ok(output: Any = None) -> Behaviour:
    return Behaviour("ok", output=output)


def sleep(seconds: float, output: Any = None) -> Behaviour:
    return Behaviour("sleep", seconds, output)


def gated(gate: threading.Event, output: Any = None) -> Behaviour:
    """Answer once `gate` is set (the test decides when the call ends, rather than hoping
    a sleep outlasts what it checks meanwhile), or the agent stops; at most a minute."""
    return Behaviour("gated", gate, output)


def status(code: int, body: str = "", headers: dict[str, str] | None = None) -> Behaviour:
    return Behaviour("status", (code, body, headers or {}))


def error(code: str, retryable: bool) -> Behaviour:
    return Behaviour("error", (code, retryable))


def garbage() -> Behaviour:
    return Behaviour("garbage")


def redirect(location: str, code: int = 302) -> Behaviour:
    return Behaviour("redirect", (code, location))


def raw(body: bytes, code: int = 200) -> Behaviour:
    """Answer exactly these bytes (application/json), whatever they are."""
    return Behaviour("raw", (code, body))


def success_with(output_json: bytes) -> Behaviour:
    """A success answer whose `output` is the given JSON text, spliced in unparsed (so it
    can hold what no JSON encoder writes: NaN, Infinity, lone surrogates, …)."""
    return raw(b'{"status": "success", "output": ' + output_json + b"}")


def large(size: int) -> Behaviour:
    """A valid success answer of about `size` bytes (a string output), streamed."""
    return Behaviour("large", size)


def trickle(body: bytes, interval: float = 1.0) -> Behaviour:
    """Status and headers at once (Content-Length of the whole body), then one byte of the
    body every `interval` seconds, until it is sent or the client hangs up."""
    return Behaviour("trickle", (body, interval))


def trickle_head(body: bytes, interval: float = 0.5) -> Behaviour:
    """The status line and headers one byte every `interval` seconds (each read the
    client makes gets a byte well within any per-read timeout), then the body."""
    return Behaviour("trickle-head", (body, interval))


def hang() -> Behaviour:
    """Read the request, then never answer: hold the connection until the client hangs up
    (or the agent stops)."""
    return Behaviour("hang")


@dataclass
class ScriptedAgent:
    """`script` is consumed one behaviour per call; `default` applies when it runs out."""

    health: str | bytes = "healthy"  # bytes: /health answers 200 with them as they are
    # Taken one a probe before `health` applies: (seconds to wait, status, body).
    health_script: deque[tuple[float, int, bytes]] = field(default_factory=deque)
    default: Behaviour = field(default_factory=ok)
    script: deque[Behaviour] = field(default_factory=deque)
    calls: list[Call] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    concurrent: int = 0
    peak_concurrent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None
    stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/agent"

    def start(self) -> ScriptedAgent:
        agent = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                # One request per connection, so a stopped agent is really unreachable.
                self.send_header("Connection", "close")
                self.close_connection = True
                self.end_headers()
                self.wfile.write(body)

            def _see(self) -> None:
                with agent.lock:
                    agent.seen.append(Seen(self.command, self.path, dict(self.headers)))

            def do_GET(self) -> None:
                self._see()
                with agent.lock:
                    scripted = agent.health_script.popleft() if agent.health_script else None
                if scripted is not None:
                    delay, code, body = scripted
                    time.sleep(delay)
                    self._send(code, body)
                elif agent.health == "missing":
                    self._send(404, b"{}")
                elif isinstance(agent.health, bytes):
                    self._send(200, agent.health)
                else:
                    self._send(200, json.dumps({"status": agent.health}).encode())

            def do_POST(self) -> None:
                self._see()
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                call = Call(dict(self.headers), json.loads(raw))
                with agent.lock:
                    agent.calls.append(call)
                    behaviour = agent.script.popleft() if agent.script else agent.default
                    agent.concurrent += 1
                    agent.peak_concurrent = max(agent.peak_concurrent, agent.concurrent)
                try:
                    call.outcome = self._answer(behaviour, call.body) or "answered"
                except (BrokenPipeError, ConnectionResetError):
                    call.outcome = "client-closed"
                    self.close_connection = True
                finally:
                    call.ended = time.monotonic()
                    with agent.lock:
                        agent.concurrent -= 1

            def _client_gone(self, wait: float) -> bool:
                """Wait up to `wait` seconds; True as soon as the client closes the
                connection (a readable socket with nothing to read is its FIN)."""
                sock = self.connection
                readable, _, _ = select.select([sock], [], [], wait)
                if not readable:
                    return False
                try:
                    return sock.recv(1, socket.MSG_PEEK) == b""
                except OSError:
                    return True

            def _head(self, code: int, length: int) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(length))
                self.send_header("Connection", "close")
                self.close_connection = True
                self.end_headers()
                self.wfile.flush()

            def _trickle(self, body: bytes, interval: float) -> str:
                self._head(200, len(body))
                for index in range(len(body)):
                    if agent.stopping.is_set():
                        return "agent-stopped"
                    self.wfile.write(body[index : index + 1])
                    self.wfile.flush()
                    if index + 1 < len(body) and self._client_gone(interval):
                        return "client-closed"
                return "answered"

            def _trickle_head(self, body: bytes, interval: float) -> str:
                head = (
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                )
                self.close_connection = True
                for index in range(len(head)):
                    if agent.stopping.is_set():
                        return "agent-stopped"
                    self.wfile.write(head[index : index + 1])
                    self.wfile.flush()
                    if self._client_gone(interval):
                        return "client-closed"
                self.wfile.write(body)
                return "answered"

            def _hang(self) -> str:
                while not agent.stopping.is_set():
                    if self._client_gone(0.1):
                        self.close_connection = True
                        return "client-closed"
                self.close_connection = True
                return "agent-stopped"

            def _large(self, size: int) -> str:
                prefix, suffix = b'{"status": "success", "output": "', b'"}'
                self._head(200, len(prefix) + size + len(suffix))
                self.wfile.write(prefix)
                chunk = b"x" * 65536
                left = size
                while left > 0:
                    if agent.stopping.is_set():
                        return "agent-stopped"
                    self.wfile.write(chunk[: min(left, len(chunk))])
                    left -= min(left, len(chunk))
                self.wfile.write(suffix)
                return "answered"

            def _answer(self, behaviour: Behaviour, task: dict[str, Any]) -> str | None:
                if behaviour.kind == "raw":
                    code, body = behaviour.value
                    self._send(code, body)
                    return None
                if behaviour.kind == "trickle":
                    return self._trickle(*behaviour.value)
                if behaviour.kind == "trickle-head":
                    return self._trickle_head(*behaviour.value)
                if behaviour.kind == "hang":
                    return self._hang()
                if behaviour.kind == "large":
                    return self._large(behaviour.value)
                output = (
                    behaviour.output if behaviour.output is not None else {"echo": task["input"]}
                )
                if behaviour.kind == "sleep":
                    time.sleep(behaviour.value)
                if behaviour.kind == "gated":
                    deadline = time.monotonic() + 60
                    while not behaviour.value.wait(0.05) and time.monotonic() < deadline:
                        if agent.stopping.is_set():
                            break
                if behaviour.kind in ("ok", "sleep", "gated"):
                    self._send(200, json.dumps({"status": "success", "output": output}).encode())
                elif behaviour.kind == "status":
                    code, body, headers = behaviour.value
                    self._send(code, body.encode(), headers)
                elif behaviour.kind == "redirect":
                    code, location = behaviour.value
                    self._send(code, b"", {"Location": location})
                elif behaviour.kind == "error":
                    code, retryable = behaviour.value
                    answer = {
                        "status": "error",
                        "code": code,
                        "message": "scripted",
                        "retryable": retryable,
                    }
                    self._send(200, json.dumps(answer).encode())
                else:
                    self._send(200, b"<html>this is not json</html>")
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.stopping.set()  # hung and trickling answers give up
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def keys(self) -> list[str]:
        return [call.headers.get("Idempotency-Key", "") for call in self.calls]


def start_agent(started: list[ScriptedAgent], **kwargs: Any) -> ScriptedAgent:
    """A ScriptedAgent serving now, stopped with the others in `started` (the `agents`
    fixture of tests/integration/conftest.py) when the test ends."""
    agent = ScriptedAgent(**kwargs).start()
    started.append(agent)
    return agent
