"""What happens to a stage after each kind of failure: pure decisions, no I/O.

Every path that can send a stage round again is counted on the stage row and bounded,
so no stage loops forever:

| failure                                   | counted in      | then                                   |
|-------------------------------------------|-----------------|----------------------------------------|
| agent error it calls retryable, 5xx, 429  | agent_attempts  | retry (backoff, at least its           |
|                                           |                 | Retry-After) ≤ retries, then fall      |
| garbage that is not the protocol          |                 | back to the next agent, else fail      |
| timeout, connection lost; a name lookup   | agent_attempts  | the same, keeping the Idempotency-Key  |
| that could not begin (RESOLVER_BUSY)      |                 |                                        |
| agent output JSON or JSONB refuses        | —               | fall back at once, else fail           |
| (INVALID_OUTPUT), a refused redirect, a   |                 |                                        |
| token no key decrypts (UNREADABLE_TOKEN)  |                 |                                        |
| agent error it calls final, other 4xx     | —               | fail                                   |
| any other exception after the claim       | errors          | retry (backoff) ≤ retries, then fail   |
| the worker stopped (lease expired)        | lease_expiries  | re-run ≤ MAOF_STAGE_MAX_LEASE_EXPIRIES |
| the message was lost (sweeper re-sends)   | requeues        | re-send ≤ MAOF_STAGE_MAX_REQUEUES      |
|                                           | (not behind a   |                                        |
|                                           | backlog)        |                                        |
| every capable agent at capacity           | waits           | wait ≤ MAOF_STAGE_MAX_WAITS            |

The Idempotency-Key (`<runId>:<stageId>:<attempt>`) changes when the agent gave a definite
answer (an error, unusable output) or the stage moves to another agent; it stays when the
same attempt may still be running on the agent's side (a timeout, a lost connection, an
error of ours after the call, a redelivery, a worker that died), so the agent can tell a
repeat from new work.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from chalicelib.agents.failure import Failure


class Action(enum.Enum):
    RETRY = "retry"  # same agent, after a backoff
    FALLBACK = "fallback"  # the next agent, at once
    FAIL = "fail"


@dataclass(frozen=True)
class Counters:
    """What the stage row says about its past."""

    agent_attempts: int  # calls counted on the current agent
    errors: int  # unexpected exceptions so far


@dataclass(frozen=True)
class Decision:
    action: Action
    delay_ms: int = 0
    keep_key: bool = False  # retry under the same Idempotency-Key
    agent_attempts: int = 0  # the stage's new count on its agent
    errors: int = 0


def backoff_ms(retry: int, base_ms: int, max_ms: int) -> int:
    """Exponential backoff with full jitter before the `retry`-th retry (1, 2, …)."""
    ceiling = min(max_ms, base_ms * 2 ** (retry - 1))
    return int(random.uniform(0, ceiling))


def after_failure(
    failure: Failure,
    counters: Counters,
    *,
    retries: int,
    other_agents: bool,
    base_backoff_ms: int,
    max_backoff_ms: int,
    retry_after_ms: int | None = None,
) -> Decision:
    """The next step for a stage whose attempt just failed with `failure`; a retry of the
    same agent waits at least what it asked for (`retry_after_ms`, its Retry-After), up to
    `max_backoff_ms`."""
    if failure is Failure.UNEXPECTED:
        errors = counters.errors + 1
        if errors <= retries:
            delay = backoff_ms(errors, base_backoff_ms, max_backoff_ms)
            return Decision(
                Action.RETRY,
                delay,
                keep_key=True,
                agent_attempts=counters.agent_attempts,
                errors=errors,
            )
        return Decision(Action.FAIL, errors=errors, agent_attempts=counters.agent_attempts)
    if failure is Failure.AGENT_FINAL:
        return Decision(
            Action.FAIL, agent_attempts=counters.agent_attempts + 1, errors=counters.errors
        )
    attempts = counters.agent_attempts + 1
    if failure is not Failure.AGENT_UNUSABLE and attempts <= retries:
        delay = backoff_ms(attempts, base_backoff_ms, max_backoff_ms)
        if retry_after_ms is not None:
            delay = max(delay, min(retry_after_ms, max_backoff_ms))
        return Decision(
            Action.RETRY,
            delay,
            keep_key=failure is Failure.IN_DOUBT,
            agent_attempts=attempts,
            errors=counters.errors,
        )
    if other_agents:
        return Decision(Action.FALLBACK, agent_attempts=0, errors=counters.errors)
    return Decision(Action.FAIL, agent_attempts=attempts, errors=counters.errors)
