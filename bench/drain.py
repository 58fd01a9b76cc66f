"""drain: N workflows queued at once, then drained by the poller at a given concurrency
(its workers stand in for concurrent Lambda executions of `run_stage`).

The runs are submitted first (through the app, in process) with no worker running; the
clock starts when the poller does and stops when the last run completes. Reported:
workflows/s and stages/s over that span; per run, `from drain start` (its completion
time since the clock started) and `run span` (its first stage taken → its run completed).
Afterwards every run must be completed, every stage completed, the queue empty, no
message reported failed, and the audit trail shows whether any stage had to wait.
"""

from __future__ import annotations

import time
from typing import Any

from bench import cpu
from bench.common import (
    WORKFLOWS,
    InProcessApi,
    Recorder,
    TimedHandler,
    audit_actions,
    counting_sqs_calls,
    load_app,
    queue_depth,
    recording,
    run_statuses,
    set_mock_delay,
    submit,
    summary_ms,
)


def measure(
    api: InProcessApi, workflow: str, runs: int, delay_ms: int, concurrency: int, timeout: float
) -> dict[str, Any]:
    from bench.env import purge_queue
    from devstack.poller import Poller

    purge_queue()
    set_mock_delay(delay_ms)
    definition = WORKFLOWS[workflow]()
    stages = len(definition["stages"])
    recorder = Recorder()
    submit_started = time.perf_counter()
    run_ids = [submit(api, definition) for _ in range(runs)]
    submit_seconds = time.perf_counter() - submit_started
    app = load_app()
    handler = TimedHandler(app.handler_map["run_stage"])
    with recording(recorder), counting_sqs_calls() as sqs_calls:
        cpu_before = cpu.snapshot()
        started = time.time()
        poller = Poller(handler, concurrency=concurrency, wait_seconds=1)
        poller.start()
        try:
            finished = recorder.wait_finished(set(run_ids), timeout=timeout)
            ended = max(recorder.finished.values(), default=time.time())
            cpu_used = cpu.used(cpu_before, cpu.snapshot())
        finally:
            poller.stop(timeout=5)
    elapsed = ended - started
    done = [r for r in run_ids if r in recorder.finished]
    from_start = [recorder.finished[r] - started for r in done]
    spans = []
    for run_id in done:
        firsts = [
            p["received"]
            for (rid, _), p in recorder.points.items()
            if rid == run_id and "received" in p
        ]
        if firsts:
            spans.append(recorder.finished[run_id] - min(firsts))
    time.sleep(0.2)
    statuses = run_statuses(run_ids)
    depth = queue_depth()
    actions = audit_actions(run_ids)
    verified = (
        finished
        and statuses.get("completed", 0) == runs
        and statuses["stages_not_completed"] == 0
        and depth == {"visible": 0, "in_flight": 0}
        and poller.failures == 0
    )
    result = {
        "workflow": workflow,
        "stages_per_run": stages,
        "runs": runs,
        "mock_agent_delay_ms": delay_ms,
        "poller_concurrency": concurrency,
        "seconds": round(elapsed, 3),
        "workflows_per_s": round(len(done) / elapsed, 2) if elapsed > 0 else None,
        "stages_per_s": round(len(done) * stages / elapsed, 1) if elapsed > 0 else None,
        "from_drain_start": summary_ms(from_start),
        "run_span": summary_ms(spans),
        "submitted_per_s": round(runs / submit_seconds, 1),
        "cpu_ms_per_stage": {
            group: round(seconds * 1000 / max(len(done) * stages, 1), 2)
            for group, seconds in cpu_used.items()
        },
        "cpu_cores_busy": {
            group: round(seconds / elapsed, 2) for group, seconds in cpu_used.items() if elapsed > 0
        },
        "run_stage_lambda": handler.summary(runs),
        # The submits' sends (one SendMessageBatch per run, before the clock) included.
        "sqs_requests_per_run": {
            name: round((count + (runs if name == "SendMessageBatch" else 0)) / runs, 3)
            for name, count in sorted({**{"SendMessageBatch": 0}, **dict(sqs_calls)}.items())
        },
        "handler_invocations": poller.invocations,
        "records_per_invocation": round(len(done) * stages / max(poller.invocations, 1), 2),
        "failed_records": poller.failures,
        "run_statuses": statuses,
        "queue_after": depth,
        "audit_actions": actions,
        "verified": verified,
    }
    flag = "ok" if verified else "NOT VERIFIED"
    print(
        f"drain: {workflow} x{runs}, agent {delay_ms} ms, concurrency {concurrency}: "
        f"{result['workflows_per_s']} workflows/s, {result['stages_per_s']} stages/s [{flag}]"
    )
    return result


def run(
    api: InProcessApi,
    workflows: list[str],
    runs: dict[str, int],
    delays: list[int],
    concurrencies: list[int],
    timeout: float,
) -> list[dict[str, Any]]:
    results = []
    try:
        for workflow in workflows:
            for delay in delays:
                for concurrency in concurrencies:
                    results.append(
                        measure(api, workflow, runs[workflow], delay, concurrency, timeout)
                    )
    finally:
        set_mock_delay(0)
    return results
