"""A scriptable agent server for tests: each POST takes the next scripted behaviour."""

from __future__ import annotations

import json
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


@dataclass
class Seen:
    """Any request that reached the server: health probes too."""

    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Behaviour:
    kind: str  # ok | sleep | status | error | garbage | redirect
    value: Any = None
    output: Any = None


def ok(output: Any = None) -> Behaviour:
    return Behaviour("ok", output=output)


def sleep(seconds: float, output: Any = None) -> Behaviour:
    return Behaviour("sleep", seconds, output)


def status(code: int, body: str = "") -> Behaviour:
    return Behaviour("status", (code, body))


def error(code: str, retryable: bool) -> Behaviour:
    return Behaviour("error", (code, retryable))


def garbage() -> Behaviour:
    return Behaviour("garbage")


def redirect(location: str, code: int = 302) -> Behaviour:
    return Behaviour("redirect", (code, location))


@dataclass
class ScriptedAgent:
    """`script` is consumed one behaviour per call; `default` applies when it runs out."""

    health: str = "healthy"
    default: Behaviour = field(default_factory=ok)
    script: deque[Behaviour] = field(default_factory=deque)
    calls: list[Call] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    concurrent: int = 0
    peak_concurrent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

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
                if agent.health == "missing":
                    self._send(404, b"{}")
                else:
                    self._send(200, json.dumps({"status": agent.health}).encode())

            def do_POST(self) -> None:
                self._see()
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with agent.lock:
                    agent.calls.append(Call(dict(self.headers), json.loads(raw)))
                    behaviour = agent.script.popleft() if agent.script else agent.default
                    agent.concurrent += 1
                    agent.peak_concurrent = max(agent.peak_concurrent, agent.concurrent)
                try:
                    self._answer(behaviour, json.loads(raw))
                finally:
                    with agent.lock:
                        agent.concurrent -= 1

            def _answer(self, behaviour: Behaviour, task: dict[str, Any]) -> None:
                output = (
                    behaviour.output if behaviour.output is not None else {"echo": task["input"]}
                )
                if behaviour.kind == "sleep":
                    time.sleep(behaviour.value)
                if behaviour.kind in ("ok", "sleep"):
                    self._send(200, json.dumps({"status": "success", "output": output}).encode())
                elif behaviour.kind == "status":
                    code, body = behaviour.value
                    self._send(code, body.encode())
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

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def keys(self) -> list[str]:
        return [call.headers.get("Idempotency-Key", "") for call in self.calls]
