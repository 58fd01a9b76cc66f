"""Entry points the Lambda handlers call: a batch of stage messages, the sweeper, and
agent health checks; and the dispatch policy of one stage (retry, fall back, wait)."""

from __future__ import annotations

import functools
import json
import os
import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from chalicelib.agents import health
from chalicelib.agents.dispatch import AgentCallFailed, AgentTask, call_agent
from chalicelib.agents.registry import invalidate_capability
from chalicelib.agents.selection import (
    AgentChoice,
    AgentsBusy,
    NoAgentAvailable,
    eligible,
    release,
    select_agent,
    settle,
)
from chalicelib.config import get_settings
from chalicelib.engine import stages, sweeper, trace
from chalicelib.engine.queue import StageMessage, send_stage_messages
from chalicelib.logs import logger
from chalicelib.workflows.references import UnresolvableReference, resolve

# Fixed at import because Chalice binds the SQS trigger when the app is loaded.
STAGE_QUEUE_NAME = os.environ.get("MAOF_STAGE_QUEUE_NAME", "maof-stage-queue")


@dataclass(frozen=True)
class DispatchPolicy:
    """A stage's timeout and retry settings: its `config`, else the MAOF_AGENT_* defaults."""

    timeout_ms: int
    retries: int
    backoff_ms: int
    max_backoff_ms: int

    @classmethod
    def of(cls, config: dict[str, Any]) -> DispatchPolicy:
        settings = get_settings()
        return cls(
            timeout_ms=int(config.get("timeoutMs", settings.agent_timeout_ms)),
            retries=int(config.get("retries", settings.agent_retries)),
            backoff_ms=int(config.get("backoffMs", settings.agent_backoff_ms)),
            max_backoff_ms=int(config.get("maxBackoffMs", settings.agent_max_backoff_ms)),
        )

    def backoff(self, retry: int) -> int:
        """Exponential backoff with full jitter for the `retry`-th retry (1, 2, …)."""
        ceiling = min(self.max_backoff_ms, self.backoff_ms * 2 ** (retry - 1))
        return int(random.uniform(0, ceiling))


def run_stage(run_id: uuid.UUID, stage_id: str) -> str:
    """Run one stage message; returns what happened (for logs and tests)."""
    trace.mark("received", run_id, stage_id)
    claimed = stages.claim_stage(run_id, stage_id)
    if claimed is None:
        remaining = stages.seconds_until_due(run_id, stage_id)
        if remaining is not None:
            # Arrived before its time (a wait longer than SQS's 15 minutes): delay again.
            send_stage_messages(run_id, [stage_id], delay_seconds=remaining)
            return "not-due"
        return "not-queued"
    trace.mark("claimed", run_id, stage_id)
    try:
        return _execute(claimed)
    except Exception:
        stages.release_stage(claimed)
        raise


def _execute(claimed: stages.ClaimedStage) -> str:
    context = stages.load_context(claimed)
    try:
        if claimed.input_template is None:
            stage_input = stages.default_input(claimed, context)
        else:
            stage_input = resolve(claimed.input_template, context.workflow_input, context.outputs)
    except UnresolvableReference as exc:
        stages.fail_stage(claimed, str(exc))
        return "failed"
    policy = DispatchPolicy.of(claimed.config)
    sticky = claimed.agent_uuid if claimed.agent_attempts else None
    tried = frozenset(str(u) for u in claimed.tried_agents)
    try:
        agent = _select_and_assign(claimed, sticky, tried)
    except NoAgentAvailable as exc:
        reason = str(exc)
        if tried:
            reason = (
                f"no agent left to try for '{claimed.capability}'; "
                f"last error: {claimed.last_error or 'none'}"
            )
        stages.fail_stage(claimed, reason, stage_input=stage_input)
        return "failed"
    except AgentsBusy as exc:
        return _wait_for_capacity(claimed, str(exc))
    except ClaimLost:
        return "lost"
    same_agent = sticky is not None and str(sticky) == agent.agent_uuid
    attempts_on_agent = (claimed.agent_attempts if same_agent else 0) + 1
    task = AgentTask(
        run_ref=f"wfr-{claimed.run_id}",
        stage_id=claimed.stage_id,
        attempt=claimed.attempt,
        capability=claimed.capability,
        input=stage_input,
        workflow_name=context.workflow_name,
        previous_stages=[
            {"stageId": dep, "completed": dep in context.outputs} for dep in claimed.dependencies
        ],
        timeout_ms=policy.timeout_ms,
    )
    trace.mark("agent-called", claimed.run_id, claimed.stage_id)
    started = time.monotonic()
    try:
        output = call_agent(agent.endpoint, agent.token, agent.agent_id, task)
    except AgentCallFailed as exc:
        settle(agent, False, (time.monotonic() - started) * 1000)
        return _after_failure(claimed, agent, exc, attempts_on_agent, policy, stage_input)
    except BaseException:
        release(agent)  # the slot is given back however the call ends
        raise
    trace.mark("agent-returned", claimed.run_id, claimed.stage_id)
    settle(agent, True, (time.monotonic() - started) * 1000)
    ready = stages.complete_stage(claimed, agent.agent_uuid, agent.agent_id, stage_input, output)
    trace.mark("completed", claimed.run_id, claimed.stage_id)
    if ready:
        send_stage_messages(claimed.run_id, ready)
        trace.mark("sent", claimed.run_id, claimed.stage_id)
    return "completed"


class ClaimLost(Exception):
    """Our lease on the stage expired and it moved on without us."""


# A cached candidate list can name an agent that Postgres no longer lets serve the run
# (deleted, or made private a moment ago); each such agent is dropped and the next tried.
MAX_ASSIGN_TRIES = 3


def _select_and_assign(
    claimed: stages.ClaimedStage, sticky: uuid.UUID | None, tried: frozenset[str]
) -> AgentChoice:
    """Reserve a slot on an agent that may serve the run and record it on the stage."""
    refused: frozenset[str] = frozenset()
    for _ in range(MAX_ASSIGN_TRIES):
        agent = select_agent(
            claimed.capability,
            claimed.owner_id,
            prefer=str(sticky) if sticky else None,
            exclude=tried | refused,
        )
        result = stages.assign_agent(claimed, agent.agent_uuid, agent.agent_id)
        if result is stages.AssignResult.ASSIGNED:
            return agent
        release(agent)
        if result is stages.AssignResult.CLAIM_LOST:
            raise ClaimLost()
        refused |= {agent.agent_uuid}
        invalidate_capability(claimed.capability)  # the cache was stale: heal it for all
    raise NoAgentAvailable(f"No available agent has the capability '{claimed.capability}'")


def _after_failure(
    claimed: stages.ClaimedStage,
    agent: AgentChoice,
    exc: AgentCallFailed,
    attempts_on_agent: int,
    policy: DispatchPolicy,
    stage_input: Any,
) -> str:
    error = f"agent '{agent.agent_id}' failed: {exc}"
    agent_uuid = uuid.UUID(agent.agent_uuid)
    if not exc.retryable:
        stages.fail_stage(claimed, error, agent.agent_id, stage_input)
        return "failed"
    if attempts_on_agent <= policy.retries:
        delay_ms = policy.backoff(attempts_on_agent)
        if stages.requeue_later(
            claimed,
            delay_ms,
            "retry",
            agent_uuid=agent_uuid,
            agent_id=agent.agent_id,
            agent_attempts=attempts_on_agent,
            tried_agents=claimed.tried_agents,
            next_attempt=True,
            details={"error": error, "code": exc.code},
        ):
            send_stage_messages(claimed.run_id, [claimed.stage_id], delay_seconds=delay_ms / 1000)
        return "retrying"
    tried = [*claimed.tried_agents, agent_uuid]
    remaining = eligible(claimed.capability, claimed.owner_id, frozenset(str(u) for u in tried))
    if not remaining:
        attempts = f"{attempts_on_agent} attempt{'s' if attempts_on_agent > 1 else ''}"
        stages.fail_stage(
            claimed,
            f"{error} ({attempts}; no other agent to fall back on)",
            agent.agent_id,
            stage_input,
        )
        return "failed"
    if stages.requeue_later(
        claimed,
        0,
        "fallback",
        agent_uuid=None,
        agent_id=agent.agent_id,
        agent_attempts=0,
        tried_agents=tried,
        next_attempt=True,
        details={"error": error, "code": exc.code, "exhaustedAgent": agent.agent_id},
    ):
        send_stage_messages(claimed.run_id, [claimed.stage_id])
    return "falling-back"


def _wait_for_capacity(claimed: stages.ClaimedStage, reason: str) -> str:
    """Every capable agent is full: come back later, without using up an attempt."""
    delay_ms = get_settings().agent_busy_wait_ms
    delay_ms = int(random.uniform(delay_ms / 2, delay_ms))
    if stages.requeue_later(
        claimed,
        delay_ms,
        "wait",
        agent_uuid=claimed.agent_uuid,
        agent_id=None,
        agent_attempts=claimed.agent_attempts,
        tried_agents=claimed.tried_agents,
        next_attempt=False,
        details={"reason": reason},
    ):
        send_stage_messages(claimed.run_id, [claimed.stage_id], delay_seconds=delay_ms / 1000)
    return "waiting"


# Up to 10 records per invocation (the SQS batch size) run at once, each in its own
# thread: a stage mostly waits (on its agent, Postgres, SQS), so a batch takes about as
# long as its slowest record rather than the sum of them. The pool is shared by every
# invocation in the process (one at a time on Lambda; several in the local poller).
_BATCH_THREADS = 10 * 64


@functools.lru_cache(maxsize=1)
def _batch_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=_BATCH_THREADS, thread_name_prefix="maof-stage")


def run_stage_batch(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Run every stage message of a batch, at once; report the ones to redeliver."""
    if len(records) == 1:
        results = [_run_record(records[0])]
    else:
        results = list(_batch_pool().map(_run_record, records))
    return {"batchItemFailures": [failure for failure in results if failure is not None]}


def _run_record(record: dict[str, Any]) -> dict[str, str] | None:
    """Run one record; the batch item failure to report, or None."""
    try:
        message = StageMessage.parse(record["body"])
    except (ValueError, KeyError, json.JSONDecodeError):
        # Not ours and never will be: drop it rather than redeliver it forever.
        logger.error(
            "dropping malformed stage message", extra={"messageId": record.get("messageId")}
        )
        return None
    try:
        outcome = run_stage(message.run_id, message.stage_id)
        trace.mark("done", message.run_id, message.stage_id)
        logger.debug(
            "stage message handled",
            extra={
                "runId": str(message.run_id),
                "stageId": message.stage_id,
                "outcome": outcome,
            },
        )
    except Exception:
        logger.exception(
            "stage message failed; it will be redelivered",
            extra={"runId": str(message.run_id), "stageId": message.stage_id},
        )
        return {"itemIdentifier": record["messageId"]}
    return None


def sweep_stalled_stages() -> dict[str, Any]:
    """Re-queue stages whose message was lost or whose worker died."""
    return sweeper.sweep()


def check_agent_health() -> dict[str, Any]:
    """Probe every agent's health endpoint and record the results."""
    return health.scheduled_check()
