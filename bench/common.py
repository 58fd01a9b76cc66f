"""What the scenarios share: the app called in process with API Gateway events, a user and
mock agents, the benchmark workflows, percentiles, and a recorder for the engine's probes."""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parents[1]
PASSWORD = "bench-password-0123"
CAPABILITIES = ("bench-extract", "bench-transform", "bench-summarize")


# ------------------------------------------------------------------ numbers


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary_ms(seconds: list[float]) -> dict[str, float]:
    """p50/p95/p99/mean/min/max of durations given in seconds, in milliseconds."""
    ms = [s * 1000 for s in seconds]
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "p50": round(percentile(ms, 50), 3),
        "p95": round(percentile(ms, 95), 3),
        "p99": round(percentile(ms, 99), 3),
        "mean": round(statistics.fmean(ms), 3),
        "min": round(min(ms), 3),
        "max": round(max(ms), 3),
    }


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


# ------------------------------------------------------------------ the app in process


class LambdaContext:
    function_name = "api_handler"
    memory_limit_in_mb = 512

    def __init__(self) -> None:
        self.aws_request_id = str(uuid.uuid4())

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


def rest_event(
    method: str,
    path: str,
    resource: str,
    path_params: dict[str, str] | None = None,
    body: Any = None,
    token: str | None = None,
) -> dict[str, Any]:
    """An API Gateway REST (proxy) event, as Lambda hands it to the Chalice app."""
    headers = {"content-type": "application/json", "host": "bench.local"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    return {
        "resource": resource,
        "path": path,
        "httpMethod": method,
        "headers": headers,
        "multiValueHeaders": {k: [v] for k, v in headers.items()},
        "queryStringParameters": None,
        "multiValueQueryStringParameters": None,
        "pathParameters": path_params,
        "stageVariables": None,
        "requestContext": {
            "resourcePath": resource,
            "httpMethod": method,
            "path": f"/api{path}",
            "stage": "api",
            "requestId": str(uuid.uuid4()),
            "identity": {"sourceIp": "127.0.0.1"},
        },
        "body": None if body is None else json.dumps(body),
        "isBase64Encoded": False,
    }


@dataclass
class InProcessApi:
    """Calls the Chalice app the way Lambda does: one API Gateway event per request."""

    app: Any
    token: str | None = None

    def call(
        self,
        method: str,
        path: str,
        resource: str | None = None,
        path_params: dict[str, str] | None = None,
        body: Any = None,
    ) -> tuple[int, Any]:
        event = rest_event(method, path, resource or path, path_params, body, self.token)
        response = self.app(event, LambdaContext())
        return int(response["statusCode"]), json.loads(response["body"])


def load_app() -> Any:
    import app as maof

    return maof.app


def sign_in(api: InProcessApi) -> InProcessApi:
    """A fresh user; returns a client with their access token."""
    email = f"bench-{uuid.uuid4().hex[:10]}@example.com"
    status, body = api.call(
        "POST", "/auth/register", body={"email": email, "password": PASSWORD, "name": "Bench"}
    )
    assert status == 201, body
    status, body = api.call("POST", "/auth/login", body={"email": email, "password": PASSWORD})
    assert status == 200, body
    return InProcessApi(api.app, body["data"]["accessToken"])


def register_mock_agents(api: InProcessApi, per_capability: int = 2) -> list[dict[str, Any]]:
    """Agents served by the built-in mock (`mock://`), each with room for 100 tasks."""
    agents = []
    for capability in CAPABILITIES:
        for index in range(per_capability):
            status, body = api.call(
                "POST",
                "/agents/register",
                body={
                    "agentId": f"{capability}-{index}-{uuid.uuid4().hex[:6]}",
                    "name": f"{capability} mock {index}",
                    "endpoint": f"mock://{capability}-{index}",
                    "authToken": "bench-agent-token",
                    "capabilities": [capability],
                    "maxConcurrentTasks": 100,
                },
            )
            assert status == 201, body
            agents.append(body["data"])
    return agents


# ------------------------------------------------------------------ workflows


def linear3() -> dict[str, Any]:
    """extract → transform → summarize, each stage referencing the previous output."""
    a, b, c = CAPABILITIES
    return {
        "name": "bench-linear-3",
        "stages": [
            {"id": "extract", "name": "Extract", "agentCapability": a},
            {
                "id": "transform",
                "name": "Transform",
                "agentCapability": b,
                "dependencies": ["extract"],
                "input": {"text": "${extract.output.result}", "lang": "${workflow.input.lang}"},
            },
            {
                "id": "summarize",
                "name": "Summarize",
                "agentCapability": c,
                "dependencies": ["transform"],
            },
        ],
    }


def fan10() -> dict[str, Any]:
    """split → 10 parallel workers → join (fan-out, fan-in)."""
    a, b, c = CAPABILITIES
    workers = [f"w{i}" for i in range(10)]
    return {
        "name": "bench-fan-1-10-1",
        "stages": [
            {"id": "split", "name": "Split", "agentCapability": a},
            *[
                {
                    "id": w,
                    "name": f"Worker {w}",
                    "agentCapability": b,
                    "dependencies": ["split"],
                    "input": {"part": w, "source": "${split.output.result}"},
                }
                for w in workers
            ],
            {"id": "join", "name": "Join", "agentCapability": c, "dependencies": workers},
        ],
    }


WORKFLOWS: dict[str, Callable[[], dict[str, Any]]] = {"linear3": linear3, "fan10": fan10}
SINKS = {"linear3": "summarize", "fan10": "join"}
WORKFLOW_INPUT = {"text": "MAOF routes every stage to an agent with the capability.", "lang": "es"}


def submit(api: InProcessApi, workflow: dict[str, Any]) -> uuid.UUID:
    status, body = api.call(
        "POST", "/workflows/execute", body={"workflow": workflow, "input": WORKFLOW_INPUT}
    )
    assert status == 202, body
    return uuid.UUID(body["data"]["workflowRunId"][len("wfr-") :])


# ------------------------------------------------------------------ probes


@dataclass
class Recorder:
    """Wall-clock times of the engine's probe points, by (run, stage)."""

    points: dict[tuple[uuid.UUID, str], dict[str, float]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    finished: dict[uuid.UUID, float] = field(default_factory=dict)
    # The last stage of every benchmark workflow: its completion is its run's.
    sinks: frozenset[str] = frozenset(SINKS.values())
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _event: threading.Condition = field(default_factory=threading.Condition)

    def __call__(self, point: str, run_id: uuid.UUID, stage_id: str) -> None:
        now = time.time()
        with self._lock:
            self.points[(run_id, stage_id)].setdefault(point, now)
        if point == "completed" and stage_id in self.sinks:
            with self._event:
                self.finished[run_id] = now
                self._event.notify_all()

    def wait_finished(self, run_ids: set[uuid.UUID], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._event:
            while not run_ids <= set(self.finished):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._event.wait(min(remaining, 0.5))
        return True


@contextmanager
def recording(recorder: Recorder) -> Iterator[Recorder]:
    from chalicelib.engine import trace

    trace.set_hook(recorder)
    try:
        yield recorder
    finally:
        trace.set_hook(None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(app: str, nodelay: bool, logs: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`python -m bench.serve` (Chalice's local server) in its own process; its base URL."""
    port = _free_port()
    args = ["-m", "bench.serve", "--app", app, "--port", str(port)]
    with open(logs / f"{app}.log", "ab") as out:
        process = subprocess.Popen(
            [sys.executable, *args, *(["--nodelay"] if nodelay else [])],
            cwd=PROJECT_DIR,
            env=dict(os.environ),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError(f"bench.serve --app {app} did not start (see {logs})") from None
            time.sleep(0.1)
    return process, f"http://127.0.0.1:{port}"


def stop_server(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()


def set_mock_delay(ms: int) -> None:
    import os

    from chalicelib.config import reset_settings

    os.environ["MAOF_MOCK_AGENT_DELAY_MS"] = str(ms)
    reset_settings()


def run_statuses(run_ids: list[uuid.UUID]) -> dict[str, int]:
    """How many of these runs are in each status, and how many stages are not completed."""
    from sqlalchemy import text

    from chalicelib.db import session_scope

    with session_scope() as session:
        rows = session.execute(
            text("SELECT status, count(*) FROM workflow_runs WHERE id = ANY(:ids) GROUP BY status"),
            {"ids": run_ids},
        ).all()
        open_stages = session.execute(
            text(
                "SELECT count(*) FROM stage_executions "
                "WHERE run_id = ANY(:ids) AND status <> 'completed'"
            ),
            {"ids": run_ids},
        ).scalar()
    counts = {row[0]: int(row[1]) for row in rows}
    counts["stages_not_completed"] = int(open_stages or 0)
    return counts


def queue_depth() -> dict[str, int]:
    """Messages in the stage queue: visible, and received but not deleted (in flight)."""
    from chalicelib.aws import aws_client, stage_queue_url

    attributes = aws_client("sqs").get_queue_attributes(
        QueueUrl=stage_queue_url(),
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return {
        "visible": int(attributes["ApproximateNumberOfMessages"]),
        "in_flight": int(attributes["ApproximateNumberOfMessagesNotVisible"]),
    }


def audit_actions(run_ids: list[uuid.UUID]) -> dict[str, int]:
    """How many audit entries of each action these runs have."""
    from sqlalchemy import text

    from chalicelib.db import session_scope

    with session_scope() as session:
        rows = session.execute(
            text(
                "SELECT action, count(*) FROM execution_logs WHERE run_id = ANY(:ids) "
                "GROUP BY action"
            ),
            {"ids": run_ids},
        ).all()
    return {row[0]: int(row[1]) for row in rows}


# ------------------------------------------------------------------ what Lambda and SQS would bill


class TimedHandler:
    """Wraps `run_stage` as the poller calls it: each invocation's duration (what Lambda
    bills) and record count."""

    def __init__(self, handler: Callable[[dict[str, Any], Any], Any]) -> None:
        self.handler = handler
        self.invocations: list[tuple[float, int]] = []
        self._lock = threading.Lock()

    def __call__(self, event: dict[str, Any], context: Any) -> Any:
        started = time.perf_counter()
        try:
            return self.handler(event, context)
        finally:
            elapsed = time.perf_counter() - started
            with self._lock:
                self.invocations.append((elapsed, len(event.get("Records", []))))

    def summary(self, runs: int) -> dict[str, Any]:
        durations = [d for d, _ in self.invocations]
        records = sum(n for _, n in self.invocations)
        # Lambda bills each invocation's duration rounded up to the next millisecond.
        billed_ms = sum(math.ceil(d * 1000) for d in durations)
        return {
            "invocations": len(durations),
            "records": records,
            "duration": summary_ms(durations),
            "invocations_per_run": round(len(durations) / max(runs, 1), 3),
            "billed_ms_per_run": round(billed_ms / max(runs, 1), 2),
        }


@contextmanager
def counting_sqs_calls() -> Iterator[dict[str, int]]:
    """Count this process's SQS API calls by operation while the block runs (ReceiveMessage
    split into calls that got messages and empty ones)."""
    from chalicelib.aws import aws_client

    counts: dict[str, int] = defaultdict(int)
    lock = threading.Lock()

    def after_call(model: Any, parsed: Any, **_: Any) -> None:
        name = model.name
        if name == "ReceiveMessage" and not (parsed or {}).get("Messages"):
            name = "ReceiveMessage (empty)"
        with lock:
            counts[name] += 1

    events = aws_client("sqs").meta.events
    events.register("after-call.sqs", after_call, unique_id="maof-bench-count")
    try:
        yield counts
    finally:
        events.unregister("after-call.sqs", unique_id="maof-bench-count")
