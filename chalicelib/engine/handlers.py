"""Entry points the Lambda handlers call: a batch of stage messages, the sweeper, and
agent health checks; and the dispatch policy of one stage (retry, fall back, wait)."""

from __future__ import annotations

import functools
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import DBAPIError

from chalicelib import observability
from chalicelib.agents import health
from chalicelib.agents.candidates import invalidate_capability
from chalicelib.agents.dispatch import AgentCallFailed, AgentTask, call_agent
from chalicelib.agents.failure import Failure
from chalicelib.agents.selection import (
    AgentChoice,
    AgentsBusy,
    NoAgentAvailable,
    eligible,
    extend,
    hand_over,
    live_slots,
    mark_waited_for,
    may_be_waited_for,
    release,
    reserve_on,
    select_agent,
    settle,
    waiting_reason,
)
from chalicelib.audit import checkpoints
from chalicelib.config import (
    STAGE_TIMEOUT_MARGIN_SECONDS,
    get_settings,
    import_time_int,
    import_time_setting,
)
from chalicelib.core.api import run_ref
from chalicelib.core.references import (
    InputTooLarge,
    UnresolvableReference,
    check_input_size,
    check_sent_size,
    resolve,
)
from chalicelib.db import is_unavailable
from chalicelib.engine import leases, stages, sweeper, trace
from chalicelib.engine.policy import Action, Counters, Decision, after_failure
from chalicelib.engine.queue import StageMessage, change_visibility, send_stage_messages
from chalicelib.logs import logger

# Fixed at import because Chalice binds the SQS trigger when the app is loaded.
STAGE_QUEUE_NAME = import_time_setting("stage_queue_name")


def _rate_minutes(interval_field: str) -> int:
    """An interval setting (seconds) as an EventBridge rate: whole minutes, one at least."""
    return max(1, import_time_int(interval_field) // 60)


# The checkpoint and agent health schedules, also fixed at import; the local poller runs
# them every MAOF_AUDIT_CHECKPOINT_INTERVAL_SECONDS and MAOF_AGENT_HEALTH_INTERVAL_SECONDS.
CHECKPOINT_RATE_MINUTES = _rate_minutes("audit_checkpoint_interval_seconds")
HEALTH_CHECK_RATE_MINUTES = _rate_minutes("agent_health_interval_seconds")


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

    def decide(
        self,
        failure: Failure,
        counters: Counters,
        other_agents: bool,
        retry_after_ms: int | None = None,
    ) -> Decision:
        return after_failure(
            failure,
            counters,
            retries=self.retries,
            other_agents=other_agents,
            base_backoff_ms=self.backoff_ms,
            max_backoff_ms=self.max_backoff_ms,
            retry_after_ms=retry_after_ms,
        )


# Less than this left of the invocation and a stage is handed back untouched, rather than
# calling its agent with no time to wait for the answer.
MIN_CALL_SECONDS = 1.0


class TaskGroup:
    """Stages an invocation took on besides its messages (hand-offs): it returns only when
    they are done, since Lambda freezes whatever still runs after it returns."""

    def __init__(self, trace: Any = None) -> None:
        self.trace = trace  # the invocation's X-Ray entity, for the threads it starts
        self._pending = 0
        self._done = threading.Condition()

    def spawn(self, task: Callable[[], Any]) -> None:
        with self._done:
            self._pending += 1
        try:
            _batch_pool().submit(self._run, task)
        except BaseException:  # not started (the pool is shutting down): not waited for
            with self._done:
                self._pending -= 1
                self._done.notify_all()
            raise

    def _run(self, task: Callable[[], Any]) -> None:
        try:
            observability.adopt_trace_entity(self.trace)
            task()
        except Exception:
            logger.exception("a stage taken on without a message raised; it was handed back")
        finally:
            with self._done:
                self._pending -= 1
                self._done.notify_all()

    def wait(self) -> None:
        with self._done:
            while self._pending:
                self._done.wait()


@dataclass(frozen=True)
class Invocation:
    """What one run_stage invocation offers its stages: a time limit (time.monotonic();
    None: none but each stage's own) and a group to run hand-offs in (None: no hand-offs)."""

    deadline: float | None = None
    group: TaskGroup | None = None
    request_id: str | None = None  # the Lambda invocation's, on every log line of its work
    started: float = field(default_factory=time.monotonic)

    def may_run_more(self) -> bool:
        """Whether to run one more handed-over stage here: within the hand-off budget, and
        with the time a stage's default call needs left in the invocation."""
        now = time.monotonic()
        if now - self.started > HANDOFF_BUDGET_SECONDS:
            return False
        needed = get_settings().agent_timeout_ms / 1000 + MIN_CALL_SECONDS
        return self.deadline is None or self.deadline - now >= needed


def run_stage(
    run_id: uuid.UUID,
    stage_id: str,
    invocation: Invocation | None = None,
    redelivered_in: float = 0,
) -> str:
    """Run one stage message; returns what happened (for logs and tests).

    Any exception after the claim counts against the stage (an attempt, then failure);
    only the infrastructure failing us (the database, the queue) hands the message back
    for redelivery, not counted, the stage due again when the message is (`redelivered_in`
    seconds), its lease running out if it cannot be released.
    """
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
    return _run_claimed(claimed, invocation or Invocation(), redelivered_in=redelivered_in)


def _run_claimed(
    claimed: stages.ClaimedStage,
    invocation: Invocation,
    handed: AgentChoice | None = None,
    count: bool = True,
    redelivered_in: float = 0,
) -> str:
    """Run a stage this worker holds (`handed`: with a slot already held on that agent,
    given back as the stage's turn ends unless its call took it);
    `count` False: the caller, which held the stage before, counts how it finished;
    `redelivered_in`: when a database failure hands it back, due again after that long."""
    started = time.monotonic()
    held = HandedSlot(handed, invocation, claimed.claim_token)
    with (
        leases.held(claimed.claim_token),
        observability.stage_context(claimed.run_id, claimed.stage_id),
        observability.traced("run_stage", runId=claimed.run_id, stageId=claimed.stage_id),
    ):
        try:
            outcome = _execute(claimed, invocation, held, redelivered_in)
        except Exception as exc:
            if is_unavailable(exc):
                _release_quietly(claimed, redelivered_in)
                raise
            outcome = _after_error(claimed, exc)
        finally:
            # Not given to a call (its input failed to resolve, an error, out of time): it
            # would otherwise be held, and renewed, to its lease's cap with no call on it.
            held.give_back()
        if count and outcome in ("completed", "failed"):
            _count_finished(claimed, outcome, started)
        return outcome


class HandedSlot:
    """The slot a stage was handed, held for it until its call takes it (`take`: the call's
    end then releases it or hands it on); `give_back` returns a slot no call took, at once,
    and wakes a stage that waits for it (idempotent: only the first gives anything back)."""

    def __init__(
        self, choice: AgentChoice | None, invocation: Invocation, releasing: uuid.UUID
    ) -> None:
        self.choice = choice
        self._invocation = invocation
        self._releasing = releasing

    def take(self) -> AgentChoice | None:
        choice, self.choice = self.choice, None
        return choice

    def give_back(self) -> None:
        choice = self.take()
        if choice is None or choice.slot is None:
            return
        release(choice)
        if may_be_waited_for(choice):
            _after_release(choice, self._invocation, self._releasing)


def _count_finished(claimed: stages.ClaimedStage, outcome: str, started: float) -> None:
    run, stage, capability = claimed.run_id, claimed.stage_id, claimed.capability
    observability.metric(
        "StagesFinished",
        1,
        dimensions={"Outcome": outcome},
        runId=run,
        stageId=stage,
        capability=capability,
    )
    observability.metric(
        "StageDuration",
        (time.monotonic() - started) * 1000,
        "ms",
        runId=run,
        stageId=stage,
        capability=capability,
    )
    observability.metric(
        "StageAttempts", claimed.attempt, runId=run, stageId=stage, capability=capability
    )


def _release_quietly(claimed: stages.ClaimedStage, due_in: float = 0) -> None:
    try:
        stages.release_stage(claimed, due_in)
    except Exception as exc:  # the database is away: the lease runs out instead
        logger.warning("could not release a stage", extra={"error": type(exc).__name__})


def _call_deadline(policy: DispatchPolicy, invocation_deadline: float | None) -> float:
    own = time.monotonic() + policy.timeout_ms / 1000
    return own if invocation_deadline is None else min(own, invocation_deadline)


def _wall_clock(deadline: float) -> float:
    """A time.monotonic() deadline as time.time() (what Redis slot leases are scored by)."""
    return time.time() + (deadline - time.monotonic())


def _execute(
    claimed: stages.ClaimedStage,
    invocation: Invocation,
    held: HandedSlot,
    redelivered_in: float = 0,
) -> str:
    invocation_deadline = invocation.deadline
    context = stages.load_context(claimed)
    try:
        stage_input = stage_input_of(claimed, context)
    except (UnresolvableReference, InputTooLarge) as exc:
        return _failed(claimed, str(exc))
    policy = DispatchPolicy.of(claimed.config)
    if (
        invocation_deadline is not None
        and invocation_deadline - time.monotonic() < MIN_CALL_SECONDS
    ):
        held.give_back()
        stages.release_stage(claimed)  # this invocation is out of time; the next one runs it
        _send(claimed.run_id, [claimed.stage_id])
        return "released"
    deadline = time.monotonic() + policy.timeout_ms / 1000
    cut_short_by = None  # what ends the call before the stage's timeout does, if anything
    if invocation_deadline is not None and invocation_deadline < deadline:
        deadline, cut_short_by = invocation_deadline, "the time left to this invocation"
    run_deadline = None
    if claimed.deadline_in is not None:  # the run's deadline wins over the stage's timeout
        run_deadline = time.monotonic() + claimed.deadline_in
        if run_deadline < deadline:
            deadline, cut_short_by = run_deadline, "the run's deadline"
    if held.choice is not None:
        # Its lease was capped when the slot was taken, before this stage had started (a
        # wait for a thread, a connection): it must last the whole call. Run out and taken
        # meanwhile, the stage looks for a slot like any other.
        held.choice = extend(held.choice, _wall_clock(deadline))
    tried = frozenset(str(u) for u in claimed.tried_agents)
    try:
        agent, attempt = _select_and_assign(claimed, tried, _wall_clock(deadline), held.take())
    except NoAgentAvailable as exc:
        reason = str(exc)
        if tried:
            reason = (
                f"no agent left to try for '{claimed.capability}'; "
                f"last error: {claimed.last_error or 'none'}"
            )
        return _failed(claimed, reason, stage_input=stage_input)
    except AgentsBusy as exc:
        return _wait_for_capacity(claimed, str(exc), invocation, redelivered_in)
    except ClaimLost:
        return "lost"
    except RunEnded:
        stages.skip_if_run_ended(claimed)
        return "skipped"
    task = AgentTask(
        run_ref=run_ref(claimed.run_id),
        stage_id=claimed.stage_id,
        attempt=attempt,
        capability=claimed.capability,
        input=stage_input,
        workflow_name=context.workflow_name,
        # Claimed only once every dependency completed (context.outputs holds only the
        # outputs its input reads).
        previous_stages=[{"stageId": dep, "completed": True} for dep in claimed.dependencies],
        timeout_ms=policy.timeout_ms,
        deadline=deadline,
        cut_short_by=cut_short_by,
    )
    trace.mark("agent-called", claimed.run_id, claimed.stage_id)
    observability.with_agent(agent.agent_id)
    started = time.monotonic()
    try:
        with observability.traced(
            "agent_call", runId=claimed.run_id, stageId=claimed.stage_id, agentId=agent.agent_id
        ):
            output = call_agent(agent.endpoint, agent.token, agent.agent_id, task)
    except AgentCallFailed as exc:
        _free_slot(agent, invocation, False, started, claimed.claim_token)
        if run_deadline is not None and time.monotonic() >= run_deadline:
            stages.expire_run(claimed.run_id)  # cut short by the run's deadline: it fails
            stages.skip_if_run_ended(claimed)
            return "deadline"
        return _after_failure(claimed, agent, exc, policy, stage_input)
    except BaseException:
        release(agent)  # the slot is given back however the call ends
        raise
    trace.mark("agent-returned", claimed.run_id, claimed.stage_id)
    _free_slot(agent, invocation, True, started, claimed.claim_token)
    try:
        done = stages.complete_stage(
            claimed,
            agent.agent_uuid,
            agent.agent_id,
            stage_input,
            output.value,
            output.text,
            # Slots are counted (Redis is up): a dependent may wait at once.
            full=functools.partial(waiting_reason, owner=claimed.owner_id)
            if agent.slot is not None
            else None,
        )
    except stages.RunOutputTooLarge as exc:
        return _failed(claimed, str(exc), agent.agent_id, stage_input)
    if done.outcome != "completed":
        return done.outcome
    trace.mark("completed", claimed.run_id, claimed.stage_id)
    if done.send:
        _dispatch(claimed, done.send, invocation)
    parked: dict[str, list[str]] = {}
    for stage_id, capability in done.parked:
        observability.metric("CapacityWaits", 1, capability=capability)
        parked.setdefault(capability, []).append(stage_id)
    for capability, waiting in parked.items():
        _look_again(claimed.run_id, waiting, capability, claimed.owner_id, invocation)
    return "completed"


def _look_again(
    run_id: uuid.UUID,
    stage_ids: list[str],
    capability: str,
    owner: uuid.UUID,
    invocation: Invocation,
) -> None:
    """A completion parked these dependents (every agent full, as far as it could see). A
    slot given back before the parking found no one waiting: look once more, as a stage
    that parks itself does, and start one in each slot there is room for after all."""
    for stage_id in stage_ids:
        try:
            default = time.monotonic() + get_settings().agent_timeout_ms / 1000
            agent = select_agent(capability, owner, slot_until=_wall_clock(default))
        except (AgentsBusy, NoAgentAvailable):
            return  # the next release hands them a slot (or the sweeper wakes them)
        except Exception as exc:
            logger.warning("could not look for a slot", extra={"error": type(exc).__name__})
            return
        try:
            _start_waiting(run_id, stage_id, agent, invocation)  # the slot's now, or given back
        except Exception as exc:  # it waits on; the next release or the sweeper wakes it
            logger.warning("could not start a waiting stage", extra={"error": type(exc).__name__})
            return


def _may_start_here(invocation: Invocation) -> bool:
    """Whether this invocation may start one more waiting stage itself (else: SQS)."""
    return invocation.group is not None and invocation.may_run_more()


def _start_waiting(
    run_id: uuid.UUID, stage_id: str, slot: AgentChoice | None, invocation: Invocation
) -> None:
    """Start a waiting stage here in the `slot` reserved for it (given back if the stage
    was taken meanwhile); without a slot (none taken, or Redis away), or past the hand-off
    budget, give the slot back and wake the stage through SQS instead."""
    if slot is None or slot.slot is None or not _may_start_here(invocation):
        if slot is not None:
            release(slot)
        if stages.wake_stage(run_id, stage_id):
            _send(run_id, [stage_id])
        return
    try:
        claimed = stages.claim_stage(run_id, stage_id, waiting=True)
    except BaseException:
        release(slot)  # not given to any stage: it would wait out its lease
        raise
    if claimed is None:
        release(slot)  # someone handed it a slot already, or its run ended
        return
    _run_here(claimed, invocation, slot)


def _run_here(
    claimed: stages.ClaimedStage, invocation: Invocation, slot: AgentChoice | None = None
) -> None:
    """Run a stage this invocation claimed in its task group (the caller checked it has
    one); `slot`, one held for it, moves under a lease to the deadline the stage would have
    if it started now (extended to its real one once it has started: _execute); if that
    slot's lease ran out and another stage took it, this one looks for a slot."""
    assert invocation.group is not None
    handed = None
    if slot is not None:
        policy = DispatchPolicy.of(claimed.config)
        handed = hand_over(slot, _wall_clock(_call_deadline(policy, invocation.deadline)))
    try:
        invocation.group.spawn(functools.partial(_run_without_message, claimed, invocation, handed))
    except BaseException:  # not started: the slot goes back, the stage's lease runs out
        if handed is not None:
            release(handed)
        raise


# A stage handed back after the database failed it is sent again after this long.
HANDED_BACK_DELAY_SECONDS = 2


def _run_without_message(
    claimed: stages.ClaimedStage, invocation: Invocation, handed: AgentChoice | None
) -> None:
    """Run a stage taken on with no message of its own (eager dispatch, a hand-off). When
    the database fails it, _run_claimed hands it back (queued, uncounted) as SQS would
    redeliver a message: here no message exists, so one is sent; else only the sweeper
    would find it, counted as a lost message (and enough of those fail a healthy run)."""
    try:
        _run_claimed(claimed, invocation, handed)
    except Exception as exc:
        if is_unavailable(exc):
            _send(claimed.run_id, [claimed.stage_id], delay_seconds=HANDED_BACK_DELAY_SECONDS)
        raise


def _free_slot(
    agent: AgentChoice,
    invocation: Invocation,
    ok: bool,
    started: float,
    releasing: uuid.UUID | None = None,
) -> None:
    """The call is over: hand its slot to a waiting stage, or give it back (and, if the
    agent was full, make sure no stage that parked meanwhile is left waiting; past the
    hand-off budget, wake the next waiting stage through SQS whatever the count says: the
    stages woken by releases just before are on their way to their slots, not in them).
    An agent no stage has found full lately is waited for by none: its slot goes back
    without a look in Postgres."""
    observability.metric(
        "AgentLatency", (time.monotonic() - started) * 1000, "ms", agentId=agent.agent_id
    )
    waited_for = agent.slot is not None and may_be_waited_for(agent)
    handed = waited_for and _hand_off(agent, invocation, releasing)
    was_full = settle(agent, ok, (time.monotonic() - started) * 1000, keep_slot=handed)
    if waited_for and not handed and (was_full or not invocation.may_run_more()):
        _after_release(agent, invocation, releasing)


def stage_input_of(claimed: stages.ClaimedStage, context: stages.StageContext) -> Any:
    """The stage's resolved input, its size checked before anything is expanded."""
    if claimed.input_template is None:
        default = stages.default_input(claimed, context)
        check_sent_size(default)  # a fan-in of many outputs is held to the cap too
        return default
    check_input_size(claimed.input_template, context.workflow_input, context.outputs)
    return resolve(claimed.input_template, context.workflow_input, context.outputs)


def _dispatch(completed: stages.ClaimedStage, ready: list[str], invocation: Invocation) -> None:
    """The stages a completion made ready: the first runs here, in this invocation, with
    no queue hop (eager dispatch), while the invocation may run more; the others, or all
    of them past the hand-off budget or with MAOF_EAGER_DISPATCH off, go through SQS. A
    crash between the completion's commit and the claim leaves the stage queued with no
    message: the sweeper sends it, as it does for a message lost between commit and send."""
    run_id, rest = completed.run_id, ready
    trace.mark("sent", run_id, completed.stage_id)
    if get_settings().eager_dispatch and _may_start_here(invocation):
        first, rest = ready[0], ready[1:]
        trace.mark("received", run_id, first)
        here = None  # None after the claim: its run ended, or a duplicate took it first
        try:
            if (here := stages.claim_stage(run_id, first)) is not None:
                trace.mark("claimed", run_id, first)
                _run_here(here, invocation)
        except Exception as exc:  # it goes through SQS with the others
            logger.warning("could not start a ready stage", extra={"error": type(exc).__name__})
            if here is not None:
                _release_quietly(here)
            rest = ready
    if rest:
        _send(run_id, rest)


def _send(
    run_id: uuid.UUID, stage_ids: list[str], delay_seconds: float = 0, fast: bool = False
) -> None:
    """Queue stages already committed as queued; if SQS fails, the sweeper sends them."""
    try:
        send_stage_messages(run_id, stage_ids, delay_seconds=delay_seconds, fast=fast)
    except Exception as exc:
        logger.warning(
            "could not queue stages; the sweeper will",
            extra={"runId": str(run_id), "stages": stage_ids, "error": type(exc).__name__},
        )


class ClaimLost(Exception):
    """Our lease on the stage expired and it moved on without us."""


class RunEnded(Exception):
    """The stage's run ended (failed, cancelled) after the claim: call no agent."""


# A cached candidate list can name an agent that Postgres no longer lets serve the run
# (deleted, or made private a moment ago); each such agent is dropped and the next tried.
MAX_ASSIGN_TRIES = 3


def _select_and_assign(
    claimed: stages.ClaimedStage,
    tried: frozenset[str],
    slot_until: float,
    handed: AgentChoice | None = None,
) -> tuple[AgentChoice, int]:
    """Reserve a slot on an agent that may serve the run (or take the `handed` one), record
    it on the stage, and say under which attempt (Idempotency-Key) to call it: the stage's
    agent so far keeps its attempt (a retry or a redelivery); another agent gets the next."""
    refused: frozenset[str] = frozenset()
    sticky = str(claimed.agent_uuid) if claimed.agent_uuid else None
    for _ in range(MAX_ASSIGN_TRIES):
        if handed is not None:
            agent, handed = handed, None
        else:
            agent = select_agent(
                claimed.capability,
                claimed.owner_id,
                slot_until=slot_until,
                prefer=sticky,
                exclude=tried | refused,
            )
        attempt = claimed.attempt if sticky in (None, agent.agent_uuid) else claimed.attempt + 1
        try:
            result = stages.assign_agent(claimed, agent.agent_uuid, agent.agent_id, attempt)
        except BaseException:
            release(agent)  # the database is away: the slot would wait out its lease
            raise
        if result is stages.AssignResult.ASSIGNED:
            return agent, attempt
        release(agent)
        if result is stages.AssignResult.CLAIM_LOST:
            raise ClaimLost()
        if result is stages.AssignResult.RUN_ENDED:
            raise RunEnded()
        refused |= {agent.agent_uuid}
        invalidate_capability(claimed.capability)  # the cache was stale: heal it for all
    raise NoAgentAvailable(f"No available agent has the capability '{claimed.capability}'")


def _after_failure(
    claimed: stages.ClaimedStage,
    agent: AgentChoice,
    exc: AgentCallFailed,
    policy: DispatchPolicy,
    stage_input: Any,
) -> str:
    """Retry the agent, fall back to another, or fail the stage (policy.after_failure)."""
    error = f"agent '{agent.agent_id}' failed: {exc}"
    agent_uuid = uuid.UUID(agent.agent_uuid)
    same_agent = claimed.agent_uuid == agent_uuid
    tried = [*claimed.tried_agents, agent_uuid]
    others = eligible(claimed.capability, claimed.owner_id, frozenset(str(u) for u in tried))
    decision = policy.decide(
        exc.failure,
        Counters(claimed.agent_attempts if same_agent else 0, claimed.errors),
        other_agents=bool(others),
        retry_after_ms=exc.retry_after_ms,
    )
    observability.metric("StageFailures", 1, dimensions={"Kind": exc.failure.value}, code=exc.code)
    details = {"error": error, "code": exc.code}
    if decision.action is Action.RETRY:
        return _requeued(
            claimed,
            stages.requeue_later(
                claimed,
                decision.delay_ms,
                "retry",
                agent_uuid=agent_uuid,
                agent_id=agent.agent_id,
                agent_attempts=decision.agent_attempts,
                tried_agents=claimed.tried_agents,
                next_attempt=not decision.keep_key,
                details=details,
            ),
            decision.delay_ms,
            "retrying",
        )
    if decision.action is Action.FALLBACK:
        observability.metric("Fallbacks", 1, agentId=agent.agent_id)
        return _requeued(
            claimed,
            stages.requeue_later(
                claimed,
                0,
                "fallback",
                agent_uuid=None,
                agent_id=agent.agent_id,
                agent_attempts=0,
                tried_agents=tried,
                next_attempt=True,
                details={**details, "exhaustedAgent": agent.agent_id},
            ),
            0,
            "falling-back",
        )
    if exc.failure is not Failure.AGENT_FINAL:
        attempts = decision.agent_attempts
        tries = f"{attempts} attempt{'s' if attempts != 1 else ''}; " if attempts else ""
        error = f"{error} ({tries}no other agent to fall back on)"
    return _failed(claimed, error, agent.agent_id, stage_input)


def _failed(
    claimed: stages.ClaimedStage,
    reason: str,
    agent_id: str | None = None,
    stage_input: Any = None,
) -> str:
    """Fail the stage: "failed"; "discarded" or "skipped" when its run had ended (the
    stage ended with it); or "lost" when the claim was no longer ours (nothing written,
    nothing to count: the worker that took it over finishes it)."""
    return stages.fail_stage(claimed, reason, agent_id, stage_input)


def _requeued(
    claimed: stages.ClaimedStage, result: stages.Requeued, delay_ms: int, outcome: str
) -> str:
    if result is stages.Requeued.QUEUED:
        _send(claimed.run_id, [claimed.stage_id], delay_seconds=delay_ms / 1000)
        return outcome
    return str(result.value)


def _after_error(claimed: stages.ClaimedStage, exc: Exception) -> str:
    """An exception of ours after the claim (a bug, an output Postgres refused, anything
    unforeseen): counted like an agent error, retried under the same Idempotency-Key (the
    agent may already have done the work), and the stage failed once retries run out."""
    logger.exception(
        "stage raised; counted against it",
        extra={"runId": str(claimed.run_id), "stageId": claimed.stage_id},
    )
    # The driver's own words, not SQLAlchemy's, which add the statement's SQL text.
    said = exc.orig if isinstance(exc, DBAPIError) else exc
    cause = f"{type(exc).__name__}: {' '.join(str(said).split())[:300]}"
    observability.metric(
        "StageFailures", 1, dimensions={"Kind": Failure.UNEXPECTED.value}, code=type(exc).__name__
    )
    policy = DispatchPolicy.of(claimed.config)
    decision = policy.decide(
        Failure.UNEXPECTED, Counters(claimed.agent_attempts, claimed.errors), other_agents=False
    )
    if decision.action is Action.RETRY:
        return _requeued(
            claimed,
            stages.requeue_later(
                claimed,
                decision.delay_ms,
                "retry",
                agent_uuid=None,
                agent_id=None,
                agent_attempts=claimed.agent_attempts,
                tried_agents=claimed.tried_agents,
                next_attempt=False,
                details={"error": f"internal error: {cause}", "code": "INTERNAL_ERROR"},
                errors=decision.errors,
                keep_agent=True,
            ),
            decision.delay_ms,
            "retrying",
        )
    errors = decision.errors
    return _failed(claimed, f"internal error: {cause} ({errors} error{'s' if errors != 1 else ''})")


def _wait_for_capacity(
    claimed: stages.ClaimedStage, reason: str, invocation: Invocation, redelivered_in: float = 0
) -> str:
    """Every agent that could take the stage is full: it waits in Postgres, uses up no
    attempt, and is handed a slot by the next worker that frees one (at most
    MAOF_STAGE_MAX_WAITS times; the sweeper wakes one whose hand-off was lost). Taken back
    under a new claim, the stage is handed back by that one, due when its message is again
    (`redelivered_in`)."""
    settings = get_settings()
    if claimed.waits + 1 > settings.stage_max_waits:
        return _failed(
            claimed, f"{reason}; gave up after {claimed.waits} waits (MAOF_STAGE_MAX_WAITS)"
        )
    parked = stages.park_stage(claimed, reason)
    observability.metric("CapacityWaits", 1, capability=claimed.capability)
    if parked is not stages.Requeued.QUEUED:
        return str(parked.value)
    # A slot freed between our look and our parking found no one waiting: look once more,
    # now that we are in line, and take the stage back if there is room after all.
    policy = DispatchPolicy.of(claimed.config)
    until = _wall_clock(_call_deadline(policy, invocation.deadline))
    try:
        agent = select_agent(
            claimed.capability,
            claimed.owner_id,
            slot_until=until,
            prefer=str(claimed.agent_uuid) if claimed.agent_uuid else None,
            exclude=frozenset(str(u) for u in claimed.tried_agents),
        )
    except (AgentsBusy, NoAgentAvailable):
        return "waiting"
    if agent.slot is None:
        return "waiting"  # without Redis nothing is full: the stage was never parked
    try:
        back = stages.claim_stage(claimed.run_id, claimed.stage_id, waiting=True)
    except BaseException:
        release(agent)  # not given to any stage: it would wait out its lease
        raise
    if back is None:
        release(agent)  # someone handed it a slot already, or its run ended
        return "waiting"
    return _run_claimed(  # we count it
        back, invocation, handed=agent, count=False, redelivered_in=redelivered_in
    )


# How long one invocation runs handed-over stages itself. Beyond it, a freed slot's next
# waiting stage is woken through the queue instead, so a long stream of hand-offs does not
# hold a worker (and the messages of new runs) for ever.
HANDOFF_BUDGET_SECONDS = 5.0


def _hand_off(
    agent: AgentChoice, invocation: Invocation, releasing: uuid.UUID | None = None
) -> bool:
    """Give the agent's slot, as its call returns, straight to the next stage waiting for
    it (fairly across users and runs), and start that stage here: no slot idles while stages wait,
    and no stage sleeps in SQS. True if the slot was handed on (it must not be released)."""
    if agent.slot is None or invocation.group is None:
        return False
    try:
        if not invocation.may_run_more():
            return False  # released as usual; _after_release wakes the next through SQS
        claimed = stages.claim_next_waiting(agent.agent_uuid, releasing)
        if claimed is not None:
            _run_here(claimed, invocation, agent)
            return True
    except Exception as exc:  # the slot is simply released; the sweeper wakes the stage
        logger.warning("could not hand a slot over", extra={"error": type(exc).__name__})
    return False


def _after_release(
    agent: AgentChoice, invocation: Invocation, releasing: uuid.UUID | None = None
) -> None:
    """The slot was given back while the agent was full. A stage that parked after our
    hand-off looked (and before the release) would otherwise wait for the next release:
    look once more, and take a slot for it if one is still free (its own re-check after
    parking covers the other order). Past the hand-off budget, wake it through SQS."""
    try:
        waiting = stages.next_waiting(agent.agent_uuid, limit=1, releasing=releasing)
        if not waiting:
            return
        run_id, stage_id = waiting[0]
        handed = None  # past the budget: woken through SQS, with no slot taken for it
        if _may_start_here(invocation):
            # The slot first (its lease runs to the default timeout; the stage's own policy
            # is not known before the claim): taken meanwhile, its taker hands it on.
            default = time.monotonic() + get_settings().agent_timeout_ms / 1000
            if (handed := reserve_on(agent, _wall_clock(default))) is None:
                return
        _start_waiting(run_id, stage_id, handed, invocation)
    except Exception as exc:
        logger.warning("could not wake a waiting stage", extra={"error": type(exc).__name__})


# Up to 10 records per invocation (the SQS batch size) run at once, each in its own
# thread: a stage mostly waits (on its agent, Postgres, SQS), so a batch takes about as
# long as its slowest record rather than the sum of them. The pool is shared by every
# invocation in the process (one at a time on Lambda; several in the local poller).
_BATCH_THREADS = 10 * 64


@functools.lru_cache(maxsize=1)
def _batch_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=_BATCH_THREADS, thread_name_prefix="maof-stage")


def run_stage_batch(records: list[dict[str, Any]], context: Any = None) -> dict[str, Any]:
    """Run every stage message of a batch, at once, within the invocation's time (the
    Lambda `context`, if given); report the ones to redeliver, and make them visible again
    soon (backoff by receive count) rather than after the queue's visibility timeout."""
    group = TaskGroup(observability.trace_entity())
    invocation = Invocation(
        _invocation_deadline(context), group, getattr(context, "aws_request_id", None)
    )
    if len(records) == 1:
        results = [_run_record(records[0], invocation)]
    else:
        results = list(_batch_pool().map(lambda r: _run_record(r, invocation), records))
    group.wait()
    failed = [record for record, failed in zip(records, results, strict=True) if failed]
    if failed:
        redeliver_soon(failed)
    # Not Powertools' BatchProcessor: it runs records one after another; these run at once.
    return {"batchItemFailures": [{"itemIdentifier": r["messageId"]} for r in failed]}


def _invocation_deadline(context: Any) -> float | None:
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    if remaining is None:
        return None
    return time.monotonic() + float(remaining()) / 1000 - STAGE_TIMEOUT_MARGIN_SECONDS


# The longest a message handed back for redelivery waits before SQS shows it again.
MAX_REDELIVERY_DELAY_SECONDS = 20


def redelivery_delay(record: dict[str, Any]) -> int:
    """Seconds before a failed record is delivered again: 0 for one that is not a stage
    message (to the dead-letter queue it goes, after its few receives), else doubling
    with each receive up to MAX_REDELIVERY_DELAY_SECONDS."""
    try:
        StageMessage.parse(record["body"])
    except (ValueError, KeyError):
        return 0
    receives = int((record.get("attributes") or {}).get("ApproximateReceiveCount") or 1)
    return int(min(MAX_REDELIVERY_DELAY_SECONDS, 2 ** (receives - 1)))


def redeliver_soon(records: list[dict[str, Any]]) -> None:
    """Best effort: when SQS cannot be told, the queue's visibility timeout applies."""
    try:
        change_visibility(
            [
                (str(r["receiptHandle"]), redelivery_delay(r))
                for r in records
                if r.get("receiptHandle")
            ]
        )
    except Exception as exc:
        logger.warning("could not shorten redelivery", extra={"error": type(exc).__name__})


def _run_record(record: dict[str, Any], invocation: Invocation) -> bool:
    """Run one record; True when it must be delivered again."""
    observability.adopt_trace_entity(invocation.group.trace if invocation.group else None)
    if invocation.request_id:
        logger.thread_safe_append_keys(function_request_id=invocation.request_id)
    try:
        message = StageMessage.parse(record["body"])
    except (ValueError, KeyError):
        # Not ours and never will be: to the dead-letter queue, the one thing it is for.
        logger.error(
            "malformed stage message; it goes to the dead-letter queue",
            extra={"messageId": record.get("messageId")},
        )
        return True
    try:
        # Handed back, it is visible again after redelivery_delay (redeliver_soon).
        outcome = run_stage(
            message.run_id, message.stage_id, invocation, redelivered_in=redelivery_delay(record)
        )
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
        return True
    return False


def sweep_stalled_stages(context: Any = None) -> dict[str, Any]:
    """Re-queue stages whose message was lost or whose worker died, within the invocation's
    time (the Lambda `context`, if given)."""
    return sweeper.sweep(context)


def write_audit_checkpoint() -> dict[str, Any]:
    """Sign a Merkle checkpoint of the runs that ended since the last one, into S3."""
    return checkpoints.checkpoint()


def check_agent_health() -> dict[str, Any]:
    """Probe every agent's health endpoint and record the results; stages waiting for an
    agent back from offline are woken at once."""
    return health.scheduled_check(available=wake_waiting_for)


def wake_waiting_for(agent_uuid: uuid.UUID, max_concurrent_tasks: int) -> int:
    """An agent may take work it could not before (registered, back from offline): wake,
    through SQS, as many of the stages waiting that it may serve as it has slots free,
    best first (next_waiting's order), rather than leave it idle until the sweeper's look.
    Their workers take its slots; the agent counts as waited for, so the releases of those
    calls hand its slots to the stages still waiting. Never raises (a failure is logged:
    the sweeper wakes them still); returns how many were woken."""
    woken: dict[uuid.UUID, list[str]] = {}
    try:
        free = max_concurrent_tasks - (live_slots(agent_uuid) or 0)
        # next_waiting lists one stage a run (its first in line): a run with several
        # waiting has its next listed in the next round.
        for _ in range(max(free, 0)):
            waiting = stages.next_waiting(str(agent_uuid), limit=free - _count(woken))
            if not waiting:
                break
            mark_waited_for([str(agent_uuid)])
            for run_id, stage_id in waiting:
                if stages.wake_stage(run_id, stage_id):  # else taken or ended meanwhile
                    woken.setdefault(run_id, []).append(stage_id)
            if _count(woken) >= free:
                break
    except Exception as exc:
        logger.warning(
            "could not wake the stages waiting for an agent; the sweeper will",
            extra={"agentUuid": str(agent_uuid), "error": type(exc).__name__},
        )
    for run_id, stage_ids in woken.items():
        _send(run_id, stage_ids, fast=True)  # an API request waits on it
    return _count(woken)


def _count(stages_by_run: dict[uuid.UUID, list[str]]) -> int:
    return sum(len(stage_ids) for stage_ids in stages_by_run.values())
