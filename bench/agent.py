"""`python -m bench.agent --port N --delay-ms 50`: an agent for the benchmarks, over real
HTTP in its own process (so its CPU is not MAOF's): it answers every capability after
sleeping `--delay-ms`, and counts what it served.

The MAOF agent protocol (docs/protocol.md): `POST /agent` with the bearer
token answers `{"status": "success", "output": {"text", "capability", "stageId"}}`;
`GET /agent/health` answers healthy. `GET /agent/stats` gives what it saw: requests,
the most it served at once (never past the maxConcurrentTasks MAOF was given, or a slot
leaked), and how long its answers took on its side; `GET /agent/calls` when each call
began and ended; `POST /agent/stats` resets them.

TCP_NODELAY is set on accepted connections: Python's http.server writes a response's
headers and body separately, and without it Nagle's algorithm holds the body back for
the client's delayed ACK (about 40 ms on every keep-alive request after the first).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PATH = "/agent"
TOKEN = "bench-agent-token"


class Stats:
    """What the agent served since the last reset (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.requests = 0
            self.in_flight = 0
            self.max_in_flight = 0
            self.busy_seconds = 0.0
            self.first_started: float | None = None
            self.last_finished: float | None = None
            self.calls: list[tuple[float, float]] = []  # (started, finished), Unix times

    def started(self) -> float:
        now = time.time()
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if self.first_started is None:
                self.first_started = now
        return now

    def finished(self, started: float) -> None:
        now = time.time()
        with self._lock:
            self.in_flight -= 1
            self.requests += 1
            self.busy_seconds += now - started
            self.last_finished = now
            self.calls.append((started, now))

    def calls_seen(self) -> list[tuple[float, float]]:
        with self._lock:
            return list(self.calls)

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self.requests,
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "mean_answer_ms": round(self.busy_seconds * 1000 / self.requests, 3)
                if self.requests
                else None,
                "busy_seconds": round(self.busy_seconds, 3),
                "first_started": self.first_started,
                "last_finished": self.last_finished,
            }


class BenchAgentServer(ThreadingHTTPServer):
    daemon_threads = True
    # Room for every connection a drain may open at once.
    request_queue_size = 256

    def __init__(self, host: str, port: int, delay_ms: int) -> None:
        self.delay = delay_ms / 1000
        self.stats = Stats()
        super().__init__((host, port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: BenchAgentServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, document: Any) -> None:
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == f"{PATH}/health":
            self._send(200, {"status": "healthy"})
        elif self.path == f"{PATH}/stats":
            self._send(200, self.server.stats.as_dict())
        elif self.path == f"{PATH}/calls":
            self._send(200, self.server.stats.calls_seen())
        else:
            self._send(404, {"status": "error", "code": "NOT_FOUND", "message": self.path})

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == f"{PATH}/stats":
            self.server.stats.reset()
            self._send(200, {"reset": True})
            return
        if self.path != PATH:
            self._send(404, {"status": "error", "code": "NOT_FOUND", "message": self.path})
            return
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self._send(401, {"status": "error", "code": "UNAUTHORIZED", "message": "bad token"})
            return
        started = self.server.stats.started()
        try:
            task = json.loads(raw)
            time.sleep(self.server.delay)
            text = task.get("input", {}).get("text", "") if isinstance(task, dict) else ""
            answer = {
                "status": "success",
                "output": {
                    "text": str(text)[:200],
                    "capability": task["capability"],
                    "stageId": task["stageId"],
                },
            }
        finally:
            self.server.stats.finished(started)
        self._send(200, answer)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.agent")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=int, default=50)
    args = parser.parse_args()
    server = BenchAgentServer(args.host, args.port, args.delay_ms)
    print(f"bench agent: http://{args.host}:{args.port}{PATH}, {args.delay_ms} ms", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
