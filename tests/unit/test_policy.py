"""The attempt accounting, as pure decisions: what happens to a stage for each kind of
failure on each attempt (chalicelib/engine/policy.py)."""

from __future__ import annotations

import random

import pytest

from chalicelib.agents.failure import Failure
from chalicelib.engine.policy import Action, Counters, Decision, after_failure, backoff_ms

RETRIES = 2  # as MAOF_AGENT_RETRIES


def decide(
    failure: Failure, agent_attempts: int = 0, errors: int = 0, others: bool = False
) -> Decision:
    return after_failure(
        failure,
        Counters(agent_attempts, errors),
        retries=RETRIES,
        other_agents=others,
        base_backoff_ms=0,
        max_backoff_ms=0,
    )


@pytest.mark.parametrize("failure", [Failure.AGENT_RETRYABLE, Failure.IN_DOUBT])
@pytest.mark.parametrize("others", [False, True])
def test_a_retryable_failure_is_retried_on_the_same_agent_while_retries_last(failure, others):
    for made in range(RETRIES):
        decision = decide(failure, agent_attempts=made, others=others)
        assert decision.action is Action.RETRY
        assert decision.agent_attempts == made + 1


@pytest.mark.parametrize("failure", [Failure.AGENT_RETRYABLE, Failure.IN_DOUBT])
def test_retries_used_up_fall_back_to_another_agent_or_fail(failure):
    assert decide(failure, agent_attempts=RETRIES, others=True).action is Action.FALLBACK
    final = decide(failure, agent_attempts=RETRIES, others=False)
    assert final.action is Action.FAIL
    assert final.agent_attempts == RETRIES + 1  # the attempts made, for the message


def test_only_a_failure_in_doubt_keeps_the_idempotency_key():
    assert decide(Failure.IN_DOUBT).keep_key is True  # the agent may still be working on it
    assert decide(Failure.AGENT_RETRYABLE).keep_key is False  # it answered: a new attempt
    assert decide(Failure.IN_DOUBT, RETRIES, others=True).keep_key is False  # another agent


def test_an_agent_that_cannot_serve_the_stage_is_left_at_once():
    assert decide(Failure.AGENT_UNUSABLE, others=True).action is Action.FALLBACK
    assert decide(Failure.AGENT_UNUSABLE, others=False).action is Action.FAIL


def test_a_final_answer_fails_the_stage_whatever_is_left():
    for others in (False, True):
        assert decide(Failure.AGENT_FINAL, others=others).action is Action.FAIL


def test_an_unexpected_error_is_counted_retried_with_the_same_key_then_fails():
    for errors in range(RETRIES):
        decision = decide(Failure.UNEXPECTED, errors=errors, others=True)
        assert (decision.action, decision.keep_key, decision.errors) == (
            Action.RETRY,
            True,
            errors + 1,
        )
    final = decide(Failure.UNEXPECTED, errors=RETRIES, others=True)
    assert (final.action, final.errors) == (Action.FAIL, RETRIES + 1)


def test_unexpected_errors_leave_the_agent_count_alone_and_agent_failures_the_error_count():
    assert decide(Failure.UNEXPECTED, agent_attempts=1, errors=0).agent_attempts == 1
    assert decide(Failure.AGENT_RETRYABLE, agent_attempts=0, errors=1).errors == 1


def test_a_fallback_starts_the_count_afresh_on_the_next_agent():
    assert decide(Failure.AGENT_UNUSABLE, agent_attempts=1, others=True).agent_attempts == 0


def test_no_retries_means_the_first_failure_decides():
    decision = after_failure(
        Failure.AGENT_RETRYABLE,
        Counters(0, 0),
        retries=0,
        other_agents=False,
        base_backoff_ms=1000,
        max_backoff_ms=1000,
    )
    assert decision.action is Action.FAIL


def test_every_path_ends_within_retries_plus_one_rounds_per_agent():
    """Feeding each decision back in: no failure kind loops past its bound."""
    for failure in Failure:
        counters, rounds = Counters(0, 0), 0
        while True:
            decision = after_failure(
                failure,
                counters,
                retries=RETRIES,
                other_agents=False,
                base_backoff_ms=0,
                max_backoff_ms=0,
            )
            rounds += 1
            if decision.action is not Action.RETRY:
                break
            counters = Counters(decision.agent_attempts, decision.errors)
        assert rounds <= RETRIES + 1, failure


def test_backoff_is_full_jitter_under_an_exponential_ceiling():
    random.seed(7)
    for retry, ceiling in [(1, 100), (2, 200), (3, 400), (4, 800), (5, 1000), (9, 1000)]:
        samples = [backoff_ms(retry, 100, 1000) for _ in range(200)]
        assert all(0 <= s <= ceiling for s in samples)
        assert max(samples) > ceiling * 0.8  # the whole range is used


def first_retry(retry_after_ms: int | None, base_ms: int, max_ms: int) -> Decision:
    return after_failure(
        Failure.AGENT_RETRYABLE,
        Counters(0, 0),
        retries=RETRIES,
        other_agents=True,
        base_backoff_ms=base_ms,
        max_backoff_ms=max_ms,
        retry_after_ms=retry_after_ms,
    )


@pytest.mark.parametrize(
    ("retry_after", "delay"),
    [(None, 0), (0, 0), (4_000, 4_000), (10**12, 30_000)],  # heeded, up to the cap
)
def test_a_retry_waits_at_least_the_agents_retry_after_up_to_the_cap(retry_after, delay):
    decision = first_retry(retry_after, 0, 30_000)
    assert (decision.action, decision.delay_ms) == (Action.RETRY, delay)


def test_a_retry_after_shorter_than_the_backoff_does_not_shorten_it():
    random.seed(3)
    decision = first_retry(1, 10_000, 10_000)
    random.seed(3)
    assert decision.delay_ms == backoff_ms(1, 10_000, 10_000) > 1
