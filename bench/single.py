"""single: one 3-stage workflow at a time on an idle stack, end to end, and where each
stage's time goes, from the engine's probes (chalicelib/engine/trace.py):

  queue hop      the previous stage's messages sent (or the submit answered) → a worker
                 has the message (SQS delivery and the poller)
  claim          message in hand → stage claimed (the claim transaction)
  dispatch       claimed → agent called (inputs, agent selection and its Redis slot)
  agent          the mocked agent's own time
  complete       agent answered → completion committed (outcome counters, the completion
                 transaction that also queues the next stage)
  send           committed → the next stage's message is on the queue

Per-stage orchestration overhead = (end to end - agent time) / stages.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import requests

from bench.common import (
    WORKFLOW_INPUT,
    InProcessApi,
    Recorder,
    TimedHandler,
    counting_sqs_calls,
    linear3,
    load_app,
    recording,
    set_mock_delay,
    start_server,
    stop_server,
    summary_ms,
)

STAGES = ("extract", "transform", "summarize")
PARTS = ("queue_hop", "claim", "dispatch", "agent", "complete", "send")


def _split(
    points: dict[tuple[uuid.UUID, str], dict[str, float]], run_id: uuid.UUID, submitted: float
) -> dict[str, list[float]]:
    parts: dict[str, list[float]] = {p: [] for p in PARTS}
    previous_sent = submitted
    for stage in STAGES:
        p = points[(run_id, stage)]
        parts["queue_hop"].append(p["received"] - previous_sent)
        parts["claim"].append(p["claimed"] - p["received"])
        parts["dispatch"].append(p["agent-called"] - p["claimed"])
        parts["agent"].append(p["agent-returned"] - p["agent-called"])
        parts["complete"].append(p["completed"] - p["agent-returned"])
        if "sent" in p:
            parts["send"].append(p["sent"] - p["completed"])
            previous_sent = p["sent"]
    return parts


def _db_view(run_ids: list[uuid.UUID]) -> dict[str, Any]:
    """The same runs as the stage rows tell it (Postgres now() is the transaction start)."""
    from sqlalchemy import text

    from chalicelib.db import session_scope

    with session_scope() as session:
        rows = session.execute(
            text(
                "SELECT EXTRACT(EPOCH FROM started_at - queued_at) AS wait, "
                "EXTRACT(EPOCH FROM completed_at - started_at) AS run "
                "FROM stage_executions WHERE run_id = ANY(:ids)"
            ),
            {"ids": run_ids},
        ).all()
        spans = session.execute(
            text(
                "SELECT EXTRACT(EPOCH FROM completed_at - created_at) FROM workflow_runs "
                "WHERE id = ANY(:ids)"
            ),
            {"ids": run_ids},
        ).scalars()
        span_list = [float(s) for s in spans]
    return {
        "stage_queued_to_started": summary_ms([float(r.wait) for r in rows]),
        "stage_started_to_completed": summary_ms([float(r.run) for r in rows]),
        "run_created_to_completed": summary_ms(span_list),
    }


def measure(
    http: requests.Session, base: str, delay_ms: int, runs: int, warmup: int
) -> dict[str, Any]:
    from bench.floors import SqsHop, StageTransaction

    body = {"workflow": linear3(), "input": WORKFLOW_INPUT}

    set_mock_delay(delay_ms)
    recorder = Recorder()
    hop_probe, txn_probe = SqsHop(), StageTransaction()
    e2e: list[float] = []
    overhead: list[float] = []
    floor_hops: list[float] = []
    floor_txns: list[float] = []
    parts: dict[str, list[float]] = {p: [] for p in (*PARTS, "submit")}
    measured: list[uuid.UUID] = []
    try:
        with recording(recorder):
            for index in range(warmup + runs):
                # The floor, sampled between runs: both see the machine in the same state.
                hop = hop_probe.sample()
                txn = txn_probe.sample()
                time.sleep(0.05)  # idle: the workers are back in their long poll
                started = time.time()
                response = http.post(f"{base}/workflows/execute", json=body, timeout=10)
                submitted = time.time()
                assert response.status_code == 202, response.text
                run_id = uuid.UUID(response.json()["data"]["workflowRunId"][len("wfr-") :])
                if not recorder.wait_finished({run_id}, timeout=30):
                    raise RuntimeError(f"single: run {run_id} did not finish within 30 s")
                if index < warmup:
                    continue
                if hop is not None:
                    floor_hops.append(hop["hop"])
                floor_txns.append(txn)
                measured.append(run_id)
                total = recorder.finished[run_id] - started
                split = _split(recorder.points, run_id, submitted)
                e2e.append(total)
                overhead.append((total - sum(split["agent"])) / len(STAGES))
                for name, values in split.items():
                    parts[name].extend(values)
                parts["submit"].append(submitted - started)
    finally:
        txn_probe.close()
    hop_floor, txn_floor = summary_ms(floor_hops), summary_ms(floor_txns)
    return {
        "mock_agent_delay_ms": delay_ms,
        "runs": runs,
        "end_to_end": summary_ms(e2e),
        "per_stage_overhead": summary_ms(overhead),
        "per_stage_split": {name: summary_ms(values) for name, values in parts.items()},
        "interleaved_floor": {
            "sqs_hop": hop_floor,
            "stage_transaction": txn_floor,
            "stage_floor_ms": round(hop_floor.get("p50", 0) + txn_floor.get("p50", 0), 3),
        },
        "stage_rows": _db_view(measured),
    }


def run(
    api: InProcessApi, runs: int, delays: list[int], concurrency: int, logs: Path
) -> dict[str, Any]:
    """Submits over HTTP (the API in its own process, as on Lambda: not sharing the
    engine's interpreter); the poller runs in this process."""
    from devstack.poller import Poller

    app = load_app()
    server, base = start_server("maof", True, logs)
    results = []
    try:
        with requests.Session() as http:
            http.headers["Authorization"] = f"Bearer {api.token}"
            for delay in delays:
                print(f"single: {runs} runs of a 3-stage workflow, mock agent {delay} ms")
                handler = TimedHandler(app.handler_map["run_stage"])
                poller = Poller(handler, concurrency=concurrency, wait_seconds=5).start()
                try:
                    with counting_sqs_calls() as sqs_calls:
                        result = measure(http, base, delay, runs, warmup=3)
                finally:
                    poller.stop(timeout=7)
                total = runs + 3  # with the warm-up runs
                result["run_stage_lambda"] = handler.summary(total)
                # The submit's send happens in the API process: one SendMessageBatch a run.
                counted = {"SendMessageBatch": 0, **dict(sqs_calls)}
                counted["SendMessageBatch"] += total
                result["sqs_requests_per_run"] = {
                    name: round(count / total, 3) for name, count in sorted(counted.items())
                }
                results.append(result)
    finally:
        stop_server(server)
        set_mock_delay(0)
    return {"poller_concurrency": concurrency, "submitted_over_http": True, "results": results}
