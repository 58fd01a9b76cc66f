"""Which capable agent a stage prefers, as pure decisions on what Redis reported: online
before degraded, then a lower recent failure rate, a lower recent latency and a lighter
load; ties at random, so load spreads (selection.py reads the figures and takes the slot)."""

from __future__ import annotations

import random
from typing import Any

# Rates and latencies count only after this many calls in the last hour.
MIN_CALLS_FOR_STATS = 5

Figures = tuple[int, float, float]  # in-flight, failure rate, mean latency ms


def figures_of(values: list[Any]) -> Figures:
    """An agent's figures from its ZCOUNT of live slots and HGETALL stats replies.

    Rates and latencies count only after MIN_CALLS_FOR_STATS calls in the last hour, so
    a new agent is not ranked below one that got lucky with its first call."""
    inflight = int(values[0] or 0)
    stats = values[1] or {}
    ok, failed = int(stats.get("ok", 0)), int(stats.get("failed", 0))
    calls = ok + failed
    if calls < MIN_CALLS_FOR_STATS:
        return (inflight, 0.0, 0.0)
    return (inflight, failed / calls, float(stats.get("latency_ms", 0)) / calls)


def status_rank(agent: dict[str, Any]) -> int:
    return 0 if agent["status"] == "online" else 1


def best_status(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The candidates of the best status among them (the choice without figures)."""
    best = min(status_rank(a) for a in found)
    return [a for a in found if status_rank(a) == best]


def preference_order(found: list[dict[str, Any]], figures: list[Figures]) -> list[int]:
    """Indexes into `found`, most preferred first."""
    order = list(range(len(found)))
    random.shuffle(order)
    order.sort(
        key=lambda i: (
            status_rank(found[i]),
            # Coarse buckets: only a clearly worse failure rate or latency ranks lower.
            round(figures[i][1], 1),
            round(figures[i][2], -2),
            figures[i][0] / found[i]["maxConcurrentTasks"],
        )
    )
    return order
