"""Which capable agent a stage prefers (agents/ranking.py): pure, no Redis."""

from __future__ import annotations

from typing import Any

from chalicelib.agents.ranking import (
    MIN_CALLS_FOR_STATS,
    best_status,
    figures_of,
    preference_order,
)


def agent(name: str, status: str = "online", slots: int = 5) -> dict[str, Any]:
    return {"agentUuid": name, "status": status, "maxConcurrentTasks": slots}


def test_a_new_agents_rates_do_not_count_before_enough_calls() -> None:
    few = {"ok": "0", "failed": str(MIN_CALLS_FOR_STATS - 1), "latency_ms": "900"}
    assert figures_of([2, few]) == (2, 0.0, 0.0)
    many = {"ok": "5", "failed": "5", "latency_ms": "1000"}
    assert figures_of(["1", many]) == (1, 0.5, 100.0)


def test_online_agents_come_before_degraded_ones_whatever_their_figures() -> None:
    found = [agent("degraded", "degraded"), agent("online")]
    figures = [(0, 0.0, 0.0), (4, 0.9, 5000.0)]
    assert preference_order(found, figures) == [1, 0]


def test_a_clearly_worse_failure_rate_ranks_lower_then_latency_then_load() -> None:
    found = [agent("failing"), agent("slow"), agent("busy"), agent("idle")]
    figures = [(0, 0.5, 0.0), (0, 0.0, 900.0), (4, 0.0, 0.0), (0, 0.0, 0.0)]
    assert preference_order(found, figures) == [3, 2, 1, 0]


def test_ties_are_broken_at_random() -> None:
    found = [agent("a"), agent("b")]
    figures = [(0, 0.0, 0.0), (0, 0.0, 0.0)]
    firsts = {preference_order(found, figures)[0] for _ in range(200)}
    assert firsts == {0, 1}


def test_without_figures_only_the_best_status_is_chosen_from() -> None:
    found = [agent("a", "degraded"), agent("b"), agent("c")]
    assert [a["agentUuid"] for a in best_status(found)] == ["b", "c"]
