"""What an operator sees: CloudWatch metrics in the Embedded Metric Format (Powertools
Metrics), X-Ray traces (Powertools Tracer) and the run, stage and agent on every log line
of a stage's work (Powertools Logger keys, per thread).

Metrics (namespace MAOF, dimension `service`: the stack's name deployed, so each stage's alarms
watch its own metrics, else `maof`; run, stage, agent and capability travel as
EMF properties, searchable in Logs Insights without becoming costly dimensions):

| metric | unit | emitted |
|---|---|---|
| StageDuration | Milliseconds | when a stage ends (claim to end) |
| AgentLatency | Milliseconds | after each agent call |
| StageAttempts | Count | when a stage ends: the attempt it ended on |
| StagesFinished | Count | when a stage ends (its worker, or the sweeper failing it), dimension Outcome (completed, failed) |
| StageFailures | Count | each failed call or error, dimension Kind (agents/failure.py) |
| Fallbacks | Count | a stage moves to another agent |
| CapacityWaits | Count | a stage waits for a slot |
| SweeperRequeues | Count | the sweeper re-queues stages |
| OldestQueuedStageAge | Seconds | each sweep, before it re-sends any: the oldest stage queued and due |

Locally the EMF lines are JSON lines on the poller's standard output (.maof/logs/poller.log);
`GET /stats` and the CLI's `maof stats` show the same story from Postgres.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

from aws_lambda_powertools import Tracer
from aws_lambda_powertools.metrics import EphemeralMetrics, MetricUnit
from aws_lambda_powertools.metrics.functions import is_metrics_disabled

from chalicelib.logs import logger

NAMESPACE = "MAOF"
SERVICE = os.environ.get("POWERTOOLS_SERVICE_NAME") or "maof"

tracer = Tracer(service=SERVICE)

UNITS = {
    "ms": MetricUnit.Milliseconds,
    "count": MetricUnit.Count,
    "seconds": MetricUnit.Seconds,
}


def metric(
    name: str,
    value: float,
    unit: str = "count",
    dimensions: dict[str, str] | None = None,
    **properties: Any,
) -> None:
    """One metric, written at once as its own EMF line (safe from any thread and process).
    Powertools' POWERTOOLS_METRICS_DISABLED=true silences them (the benchmarks and most
    tests do)."""
    if is_metrics_disabled():
        return
    try:
        emf = EphemeralMetrics(namespace=NAMESPACE)
        emf.add_metric(name=name, unit=UNITS[unit], value=value)
        emf.add_dimension(name="service", value=SERVICE)
        for key, dimension in (dimensions or {}).items():
            emf.add_dimension(name=key, value=dimension)
        for key, item in properties.items():
            if item is not None:
                emf.add_metadata(key=key, value=str(item))
        _write_line(json.dumps(emf.serialize_metric_set(), separators=(",", ":")) + "\n")
    except Exception as exc:  # a metric must never fail a stage (nor a closed output)
        logger.warning("metric not emitted", extra={"metric": name, "error": type(exc).__name__})


_writing = threading.Lock()


def _write_line(line: str) -> None:
    """Powertools' own flush prints a document and its newline in two writes, so threads
    emitting at once (a batch's records) ran their lines together, and CloudWatch drops a
    line that is not one JSON document. Written here whole and flushed at once: nor do
    processes sharing an output (the local poller's helpers) cut into each other's lines."""
    with _writing:
        sys.stdout.write(line)
        sys.stdout.flush()


@contextlib.contextmanager
def stage_context(run_id: Any, stage_id: str) -> Iterator[None]:
    """Every log line of this thread carries the run and stage while the block runs."""
    logger.thread_safe_append_keys(runId=str(run_id), stageId=stage_id)
    try:
        yield
    finally:
        logger.thread_safe_remove_keys(["runId", "stageId", "agentId"])


def with_agent(agent_id: str) -> None:
    logger.thread_safe_append_keys(agentId=agent_id)


@contextlib.contextmanager
def traced(name: str, **annotations: Any) -> Iterator[None]:
    """An X-Ray subsegment annotated with `annotations` (a no-op where tracing is off:
    locally, in tests). Worker threads attach to the invocation's segment."""
    if tracer.disabled:
        yield
        return
    with tracer.provider.in_subsegment(name) as subsegment:
        for key, value in annotations.items():
            if value is not None:
                subsegment.put_annotation(key=key, value=str(value))
        yield


def trace_entity() -> Any:
    """The current X-Ray entity, to hand to the threads that work for this invocation."""
    if tracer.disabled:
        return None
    from aws_xray_sdk.core import xray_recorder  # loaded only where tracing is on

    return xray_recorder.get_trace_entity()


def adopt_trace_entity(entity: Any) -> None:
    if entity is None or tracer.disabled:
        return
    from aws_xray_sdk.core import xray_recorder  # loaded only where tracing is on

    xray_recorder.set_trace_entity(entity)
