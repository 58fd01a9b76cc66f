"""capacity: MAOF as `make dev` runs it, driving agents that have few slots.

The API (`python -m devstack.api`) and the SQS poller (`python -m
devstack.poller`) run as processes of their own with make dev's defaults (the
code's: the environment's MAOF_POLLER_* and the bench's knobs for the in-process scenarios
are dropped; kept are the bench's database, queue and Redis db, see bench/env.py, and its
raised per-user limits; `--dev-setting KEY=VALUE` tries another value, and says so).
Three agents (bench/agent.py, each in its own process, answering after `delay` ms) serve
one capability each of a 3-stage pipeline (extract → translate → summarize).

- drain: N runs submitted at once over HTTP (several clients), the agents registered with
  `slots` maxConcurrentTasks each, and again, in the same run, with 100 (unlimited: the
  poller's threads are the limit). The clock runs from the first submit to the last run's
  completion (`completed_at`, Postgres's clock, the same host's). Slot utilisation =
  achieved stages/s ÷ (total slots ÷ agent delay): how much of what the agents could take
  MAOF gave them. CPU per stage by process (API, poller, agents, Postgres, Redis,
  LocalStack; `bench` is this process: the submitting clients and the polling for the
  end). Verified: every run and stage completed, the queue empty, no agent ever served
  more calls at once than its slots (as the agent itself counted them).
- single: one run at a time through the same services, what a user of make dev sees:
  from the client sending its POST to the run completed (client-side; the run's
  `completed_at`, read by polling Postgres every 5 ms) and from the run's row created to
  completed (server-side), and per stage from the stage rows.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from bench import cpu, env
from bench.agent import PATH as AGENT_PATH
from bench.agent import TOKEN as AGENT_TOKEN
from bench.common import PASSWORD, PROJECT_DIR, summary_ms

STAGE_NAMES = ("extract", "translate", "summarize")
# What bench/env.py sets that make dev's processes keep here: the bench's own data (apart
# from dev and test data), and per-user limits raised (one user submits hundreds of runs:
# the limits would measure themselves). The rest is for the in-process scenarios.
KEPT = (
    "MAOF_STAGE",
    "MAOF_DATABASE_URL",
    "MAOF_REDIS_URL",
    "MAOF_STAGE_QUEUE_NAME",
    "MAOF_DASHBOARD_BUCKET",
    "MAOF_SUBMISSIONS_PER_MINUTE",
    "MAOF_MAX_ACTIVE_RUNS",
)
UNLIMITED_SLOTS = 100  # the most maxConcurrentTasks an agent may declare


def dev_environ(overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The environment make dev gives the API and the poller, on the bench's data
    (`overrides`: settings to try instead of make dev's)."""
    from devstack.dev import allow_private_endpoints_by_default

    environ = dict(os.environ)
    for key in env.bench_environ():
        if key not in KEPT:
            environ.pop(key, None)
    for key in [k for k in environ if k.startswith("MAOF_POLLER_")]:
        environ.pop(key)
    allow_private_endpoints_by_default(environ)  # the agents listen on 127.0.0.1
    environ.update(overrides or {})
    return environ


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(args: list[str], environ: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, *args],
            cwd=PROJECT_DIR,
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def _wait_until(ready: Any, process: subprocess.Popen[bytes], what: str, log: Path) -> Any:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"capacity: {what} exited (see {log})")
        try:
            found = ready()
        except (OSError, requests.RequestException):
            found = None
        if found:
            return found
        time.sleep(0.1)
    raise RuntimeError(f"capacity: {what} did not start within 60 s (see {log})")


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(30)  # the poller lets its long polls return first
        except subprocess.TimeoutExpired:
            process.kill()


@dataclass
class Services:
    """The processes this scenario started, and how to reach them."""

    api_base: str
    agent_endpoints: list[str]
    poller_settings: dict[str, int]
    pids: dict[int, str]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def stop(self) -> None:
        _stop(self.processes)


_BANNER = re.compile(
    r"poller: draining \S+ with up to (\d+) executions, batches of up to (\d+), "
    r"(\d+) s long polls, (\d+) database connections kept, in (\d+) process"
)


def start_services(
    agents: int,
    delay_ms: int,
    logs: Path,
    overrides: dict[str, str] | None = None,
    trace_to: Path | None = None,
) -> Services:
    """The agents, the API and the poller (`trace_to`: the poller's probes recorded there,
    bench/traced.py)."""
    environ = dev_environ(overrides)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        ports = [_free_port() for _ in range(agents)]
        agent_processes = []
        for index, port in enumerate(ports):
            log = logs / f"agent-{index}.log"
            process = _start(
                ["-m", "bench.agent", "--port", str(port), "--delay-ms", str(delay_ms)],
                environ,
                log,
            )
            processes.append(process)
            agent_processes.append((process, port, log))
        api_port = _free_port()
        api_log, poller_log = logs / "api.log", logs / "poller.log"
        api = _start(["-m", "devstack.api", "--port", str(api_port)], environ, api_log)
        processes.append(api)
        poller_log_start = poller_log.stat().st_size if poller_log.exists() else 0
        traced = ["-m", "bench.traced", str(trace_to), "--"] if trace_to else ["-m"]
        poller = _start([*traced, "devstack.poller"], environ, poller_log)
        processes.append(poller)
        for process, port, log in agent_processes:
            _wait_until(
                lambda port=port: (
                    requests.get(f"http://127.0.0.1:{port}{AGENT_PATH}/health", timeout=1).ok
                ),
                process,
                "a bench agent",
                log,
            )
        base = f"http://127.0.0.1:{api_port}"
        _wait_until(
            lambda: requests.get(f"{base}/health", timeout=1).json()["data"]["status"] == "ok",
            api,
            "the API",
            api_log,
        )

        def banner() -> re.Match[str] | None:
            with open(poller_log, "rb") as log:
                log.seek(poller_log_start)
                return _BANNER.search(log.read().decode(errors="replace"))

        found = _wait_until(banner, poller, "the poller", poller_log)
    except BaseException:
        _stop(processes)
        raise
    pids = {p.pid: "agents" for p, _, _ in agent_processes}
    pids[api.pid] = "api"
    pids[poller.pid] = "poller"
    return Services(
        api_base=base,
        agent_endpoints=[f"http://127.0.0.1:{port}{AGENT_PATH}" for port in ports],
        poller_settings={
            "concurrency": int(found.group(1)),
            "batch_size": int(found.group(2)),
            "wait_seconds": int(found.group(3)),
            "database_connections_kept": int(found.group(4)),
            "processes": int(found.group(5)),
        },
        pids=pids,
        processes=processes,
    )


class HttpClient:
    """MAOF's API over HTTP, as one user; one keep-alive connection per thread."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.token: str | None = None
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        response = self._session().request(
            method, self.base + path, json=body, headers=headers, timeout=30
        )
        return response.status_code, response.json()

    def sign_in(self) -> HttpClient:
        email = f"bench-capacity-{uuid.uuid4().hex[:10]}@example.com"
        status, body = self.call(
            "POST", "/auth/register", {"email": email, "password": PASSWORD, "name": "Bench"}
        )
        assert status == 201, body
        status, body = self.call("POST", "/auth/login", {"email": email, "password": PASSWORD})
        assert status == 200, body
        self.token = body["data"]["accessToken"]
        return self


def register_agents(http: HttpClient, endpoints: list[str], slots: int) -> list[str]:
    """One agent per endpoint, one capability each (new names: no other drain's agents
    serve them); the capabilities, in pipeline order."""
    tag = uuid.uuid4().hex[:6]
    capabilities = []
    for name, endpoint in zip(STAGE_NAMES, endpoints, strict=True):
        capability = f"bench-{name}-{tag}"
        status, body = http.call(
            "POST",
            "/agents/register",
            {
                "agentId": f"bench-{name}-{slots}-{tag}",
                "name": f"bench {name} agent ({slots} slots)",
                "endpoint": endpoint,
                "authToken": AGENT_TOKEN,
                "capabilities": [capability],
                "maxConcurrentTasks": slots,
            },
        )
        assert status == 201, body
        assert body["data"]["status"] == "online", body
        capabilities.append(capability)
    return capabilities


def workflow(capabilities: list[str]) -> dict[str, Any]:
    """extract → translate → summarize, each stage reading the previous one's output."""
    extract, translate, summarize = capabilities
    return {
        "workflow": {
            "name": "bench-capacity-3",
            "stages": [
                {"id": "extract", "name": "Extract", "agentCapability": extract},
                {
                    "id": "translate",
                    "name": "Translate",
                    "agentCapability": translate,
                    "dependencies": ["extract"],
                    "input": {"text": "${extract.output.text}", "targetLanguage": "es"},
                },
                {
                    "id": "summarize",
                    "name": "Summarize",
                    "agentCapability": summarize,
                    "dependencies": ["translate"],
                    "input": {"text": "${translate.output.text}"},
                },
            ],
        },
        "input": {"text": "MAOF routes every stage to an agent with the capability."},
    }


def _submit(http: HttpClient, body: dict[str, Any]) -> uuid.UUID:
    status, answer = http.call("POST", "/workflows/execute", body)
    assert status == 202, answer
    return uuid.UUID(answer["data"]["workflowRunId"][len("wfr-") :])


def _ended(run_ids: list[uuid.UUID]) -> int:
    from sqlalchemy import text

    from chalicelib.db import session_scope

    with session_scope() as session:
        return int(
            session.execute(
                text(
                    "SELECT count(*) FROM workflow_runs WHERE id = ANY(:ids) "
                    "AND status IN ('completed', 'failed', 'cancelled')"
                ),
                {"ids": run_ids},
            ).scalar()
            or 0
        )


def _wait_ended(run_ids: list[uuid.UUID], timeout: float, every: float) -> bool:
    deadline = time.monotonic() + timeout
    while _ended(run_ids) < len(run_ids):
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


def _run_times(run_ids: list[uuid.UUID]) -> list[tuple[float, float]]:
    """(created, completed) of each completed run, as Unix times."""
    from sqlalchemy import text

    from chalicelib.db import session_scope

    with session_scope() as session:
        rows = session.execute(
            text(
                "SELECT EXTRACT(EPOCH FROM created_at) AS created, "
                "EXTRACT(EPOCH FROM completed_at) AS completed FROM workflow_runs "
                "WHERE id = ANY(:ids) AND status = 'completed'"
            ),
            {"ids": run_ids},
        ).all()
    return [(float(r.created), float(r.completed)) for r in rows]


def occupancy(calls: list[list[float]], start: float, end: float, slots: int) -> dict[str, float]:
    """Of the span start → end, the share an agent spent with every slot busy and with
    none, from its calls' (started, finished) times."""
    span = end - start
    if span <= 0:
        return {}
    events = sorted([(s, 1) for s, _ in calls] + [(e, -1) for _, e in calls])
    level, last, full, idle = 0, start, 0.0, 0.0
    for moment, change in events:
        moment = min(max(moment, start), end)
        if level >= slots:
            full += moment - last
        elif level == 0:
            idle += moment - last
        last, level = moment, level + change
    if level == 0:
        idle += end - last
    return {"all_slots_busy": round(full / span, 3), "no_slot_busy": round(idle / span, 3)}


def _agent_calls(endpoints: list[str]) -> list[list[list[float]]]:
    return [requests.get(f"{e}/calls", timeout=5).json() for e in endpoints]


def _agent_stats(endpoints: list[str], reset: bool = False) -> list[dict[str, Any]]:
    method = requests.post if reset else requests.get
    return [method(f"{e}/stats", timeout=5).json() for e in endpoints]


def drain(
    services: Services,
    slots: int,
    runs: int,
    delay_ms: int,
    clients: int,
    timeout: float,
    warmup: int = 10,
) -> dict[str, Any]:
    from bench.common import audit_actions, queue_depth, run_statuses

    http = HttpClient(services.api_base).sign_in()
    capabilities = register_agents(http, services.agent_endpoints, slots)
    body = workflow(capabilities)
    warm = [_submit(http, body) for _ in range(warmup)]
    if not _wait_ended(warm, timeout=30, every=0.05):
        raise RuntimeError("capacity: the warm-up runs did not finish within 30 s")
    _agent_stats(services.agent_endpoints, reset=True)

    cpu_before = cpu.snapshot(services.pids)
    busy_before = cpu.machine_busy()
    started = time.time()
    with ThreadPoolExecutor(clients) as pool:
        run_ids = list(pool.map(lambda _: _submit(http, body), range(runs)))
    submitted = time.time()
    finished = _wait_ended(run_ids, timeout, every=0.05)
    cpu_used = cpu.used(cpu_before, cpu.snapshot(services.pids))
    busy_after = cpu.machine_busy()
    times = _run_times(run_ids)
    ended = max((c for _, c in times), default=time.time())
    elapsed = ended - started
    stages = len(STAGE_NAMES)
    done_stages = len(times) * stages
    agents = _agent_stats(services.agent_endpoints)
    calls = _agent_calls(services.agent_endpoints)
    statuses = run_statuses(run_ids)
    # The poller deletes an invocation's messages when it returns (after its hand-offs).
    depth = queue_depth()
    settle_by = time.monotonic() + 10
    while depth != {"visible": 0, "in_flight": 0} and time.monotonic() < settle_by:
        time.sleep(0.2)
        depth = queue_depth()
    actions = audit_actions(run_ids)
    stages_per_s = done_stages / elapsed if elapsed > 0 else 0.0
    capacity_per_s = stages * slots / (delay_ms / 1000)
    machine_seconds = busy_after[1] - busy_before[1]
    verified = (
        finished
        and statuses.get("completed", 0) == runs
        and statuses["stages_not_completed"] == 0
        and depth == {"visible": 0, "in_flight": 0}
        and all(a["max_in_flight"] <= slots for a in agents)
    )
    result = {
        "slots_per_agent": slots,
        "agents": stages,
        "agent_delay_ms": delay_ms,
        "runs": runs,
        "stages_per_run": stages,
        "submit_clients": clients,
        "seconds": round(elapsed, 3),
        "submit_seconds": round(submitted - started, 3),
        "runs_per_s": round(len(times) / elapsed, 2) if elapsed > 0 else None,
        "stages_per_s": round(stages_per_s, 1),
        "slot_capacity_stages_per_s": round(capacity_per_s, 1),
        "slot_utilisation": round(stages_per_s / capacity_per_s, 3),
        "run_time": summary_ms([c - s for s, c in times]),
        "from_first_submit": summary_ms([c - started for _, c in times]),
        "agents_seen": [
            {
                "requests": a["requests"],
                "max_in_flight": a["max_in_flight"],
                "mean_answer_ms": a["mean_answer_ms"],
                # The agent's own view: time it spent answering / (slots x the drain).
                "busy_share_of_slots": round(a["busy_seconds"] / (slots * elapsed), 3)
                if elapsed > 0
                else None,
                **occupancy(c, started, ended, slots),
            }
            for a, c in zip(agents, calls, strict=True)
        ],
        "cpu_ms_per_stage": {
            group: round(seconds * 1000 / max(done_stages, 1), 2)
            for group, seconds in cpu_used.items()
        },
        "cpu_cores_busy": {
            group: round(seconds / elapsed, 2) for group, seconds in cpu_used.items() if elapsed > 0
        },
        # Every process on the machine (other users' too), from /proc/stat.
        "machine_cores_busy": round(
            (busy_after[0] - busy_before[0]) / machine_seconds * (os.cpu_count() or 1), 2
        )
        if machine_seconds > 0
        else None,
        "machine_cores": os.cpu_count(),
        "run_statuses": statuses,
        "queue_after": depth,
        "audit_actions": actions,
        "verified": verified,
        "run_ids": run_ids,  # for trace_split; not kept in the results
    }
    flag = "ok" if verified else "NOT VERIFIED"
    print(
        f"capacity: {runs} runs, 3 agents x {slots} slots x {delay_ms} ms: "
        f"{result['runs_per_s']} runs/s, {result['stages_per_s']} stages/s, "
        f"slot utilisation {result['slot_utilisation']:.0%}, run time p50 "
        f"{result['run_time'].get('p50')} ms [{flag}]"
    )
    return result


def _stage_view(run_ids: list[uuid.UUID]) -> dict[str, Any]:
    """Per stage, from its row: queued → claimed (the SQS hop and the claim; a stage is
    queued in the transaction that completes the one before it) and claimed → completed
    (the agent's call and the engine's work around it)."""
    from sqlalchemy import text

    from chalicelib.db import session_scope

    with session_scope() as session:
        rows = session.execute(
            text(
                "SELECT EXTRACT(EPOCH FROM started_at - queued_at) AS waited, "
                "EXTRACT(EPOCH FROM completed_at - started_at) AS ran "
                "FROM stage_executions WHERE run_id = ANY(:ids)"
            ),
            {"ids": run_ids},
        ).all()
    return {
        "queued_to_claimed": summary_ms([float(r.waited) for r in rows]),
        "claimed_to_completed": summary_ms([float(r.ran) for r in rows]),
    }


def single(
    services: Services, runs: int, delay_ms: int, warmup: int = 3, pause: float = 0.05
) -> dict[str, Any]:
    """One run at a time through make dev's services: client-side (POST sent → run
    completed) and server-side (run created → completed), p50 over `runs`."""
    http = HttpClient(services.api_base).sign_in()
    capabilities = register_agents(http, services.agent_endpoints, 5)
    body = workflow(capabilities)
    client_side: list[float] = []
    submit: list[float] = []
    measured: list[uuid.UUID] = []
    _agent_stats(services.agent_endpoints, reset=True)
    for index in range(warmup + runs):
        time.sleep(pause)  # an idle stack between runs: the workers are back in their poll
        started = time.time()
        run_id = _submit(http, body)
        answered = time.time()
        if not _wait_ended([run_id], timeout=30, every=0.005):
            raise RuntimeError(f"capacity single: run {run_id} did not finish within 30 s")
        if index < warmup:
            continue
        ((_, completed),) = _run_times([run_id])
        client_side.append(completed - started)
        submit.append(answered - started)
        measured.append(run_id)
    times = _run_times(measured)
    server_side = [c - s for s, c in times]
    agents = _agent_stats(services.agent_endpoints)
    answer_ms = statistics.fmean(a["mean_answer_ms"] for a in agents if a["mean_answer_ms"])
    stages = len(STAGE_NAMES)
    p50 = summary_ms(server_side)["p50"]
    result = {
        "runs": runs,
        "agent_delay_ms": delay_ms,
        "agent_answer_ms_mean": round(answer_ms, 3),
        "client_side": summary_ms(client_side),
        "server_side": summary_ms(server_side),
        "submit_http": summary_ms(submit),
        "orchestration_per_stage_ms_p50": round((p50 - stages * answer_ms) / stages, 2),
        "per_stage": _stage_view(measured),
    }
    print(
        f"capacity single: {runs} runs through make dev's services, {delay_ms} ms agents: "
        f"client-side p50 {result['client_side']['p50']} ms, server-side p50 {p50} ms"
    )
    return result


TRACE_PARTS = (
    ("queue_hop", "previous stage's messages sent (or the run created) → a worker has it"),
    ("claim", "→ claimed"),
    ("slot_wait_and_dispatch", "→ its agent called (waiting for a slot, if it waited)"),
    ("agent", "→ the agent answered"),
    ("complete", "→ completion committed"),
    ("send", "→ the next stage's message sent"),
)


def _read_trace(path: Path) -> dict[tuple[str, str], dict[str, float]]:
    """The first time of each probe point, by (run id, stage id)."""
    points: dict[tuple[str, str], dict[str, float]] = {}
    if not path.exists():
        return points
    for line in path.read_text().splitlines():
        point, run_id, stage_id, moment = json.loads(line)
        points.setdefault((run_id, stage_id), {}).setdefault(point, moment)
    return points


def trace_split(
    points: dict[tuple[str, str], dict[str, float]], run_ids: list[uuid.UUID]
) -> dict[str, dict[str, float]]:
    """Where the stages of these runs spent their time, from the poller's probes (ms)."""
    from sqlalchemy import text

    from chalicelib.db import session_scope

    with session_scope() as session:
        created = {
            str(r.id): float(r.created)
            for r in session.execute(
                text(
                    "SELECT id, EXTRACT(EPOCH FROM created_at) AS created FROM workflow_runs "
                    "WHERE id = ANY(:ids)"
                ),
                {"ids": run_ids},
            )
        }
    parts: dict[str, list[float]] = {name: [] for name, _ in TRACE_PARTS}
    order = ("received", "claimed", "agent-called", "agent-returned", "completed", "sent")
    for run_id in map(str, run_ids):
        previous = created.get(run_id)
        for stage in STAGE_NAMES:
            p = points.get((run_id, stage), {})
            if previous is not None and "received" in p:
                parts["queue_hop"].append(p["received"] - previous)
            for (name, _), (start, end) in zip(
                TRACE_PARTS[1:], itertools.pairwise(order), strict=True
            ):
                if start in p and end in p:
                    parts[name].append(p[end] - p[start])
            previous = p.get("sent")
    return {name: summary_ms(values) for name, values in parts.items()}


def run(
    runs: int,
    slots: int,
    delay_ms: int,
    clients: int,
    repeats: int,
    single_runs: int,
    timeout: float,
    logs: Path,
    overrides: dict[str, str] | None = None,
    trace: bool = False,
    paced_delay_ms: int = 0,
) -> dict[str, Any]:
    trace_to = logs / "poller-trace.jsonl" if trace else None
    if trace_to:
        trace_to.unlink(missing_ok=True)
    services = start_services(len(STAGE_NAMES), delay_ms, logs, overrides, trace_to)
    try:
        print(
            f"capacity: make dev's API and poller ({services.poller_settings}), "
            f"3 agents over HTTP, {delay_ms} ms"
        )
        drains = []
        for _ in range(repeats):
            for count in (slots, UNLIMITED_SLOTS):
                drains.append(drain(services, count, runs, delay_ms, clients, timeout))
        single_result = single(services, single_runs, delay_ms) if single_runs else None
    finally:
        services.stop()
    if trace_to:
        points = _read_trace(trace_to)
        for item in drains:
            item["trace_split"] = trace_split(points, item.pop("run_ids"))
    for item in drains:
        item.pop("run_ids", None)
    paced = None
    if paced_delay_ms:
        # Slot utilisation where the machine is not the bottleneck: the same drain with
        # agents slow enough that their slots, not the cores, are what runs out.
        services = start_services(len(STAGE_NAMES), paced_delay_ms, logs, overrides)
        try:
            paced = drain(services, slots, runs, paced_delay_ms, clients, timeout)
        finally:
            services.stop()
        paced.pop("run_ids", None)
    limited = [d for d in drains if d["slots_per_agent"] == slots]
    unlimited = [d for d in drains if d["slots_per_agent"] == UNLIMITED_SLOTS]
    ratios = [
        round(a["stages_per_s"] / b["stages_per_s"], 3)
        for a, b in zip(limited, unlimited, strict=True)
        if b["stages_per_s"]
    ]
    return {
        "services": "make dev's: devstack.api and devstack.poller, own processes",
        "poller": services.poller_settings,
        # Settings given with --dev-setting: not make dev's defaults.
        "dev_settings_overridden": dict(overrides or {}),
        "slots": slots,
        "agent_delay_ms": delay_ms,
        "drains": drains,
        "traced": trace,
        "limited_to_unlimited": ratios,
        "single": single_result,
        "paced": paced,
    }
