"""Outages in the middle of a drain of 100+ runs, on an isolated stack of their own (see
tests/faults/chaos.py): every accepted run ends, each stage's effects happen once, nothing
happens to a run after it ended, and the last run ends within RECOVERY_LIMIT_SECONDS of the
dependency answering again. `make chaos` runs the same and prints the table."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults import chaos


@pytest.fixture(scope="module")
def chaos_stack() -> Iterator[chaos.ChaosStack]:
    """Started once for the module, torn down after it (also when a test fails)."""
    with chaos.running_stack() as stack:
        yield stack


# Each fault takes a drain plus, when something is stuck, STUCK_AFTER_SECONDS; the first
# also starts the stack.
@pytest.mark.timeout(420)
@pytest.mark.parametrize("fault", list(chaos.FAULTS))
def test_every_accepted_run_ends_after(chaos_stack, fault):
    result = chaos.run_fault(chaos_stack, fault)
    assert result.accepted >= chaos.RUNS_BEFORE_FAULT, result.summary()
    assert result.stuck == 0, result.summary()
    assert result.recovery_seconds is not None, result.summary()
    assert result.recovery_seconds <= chaos.RECOVERY_LIMIT_SECONDS, result.summary()
    assert result.problems() == [], result.summary()
