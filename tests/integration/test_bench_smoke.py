"""The benchmark's own parts still run against the real services (make bench is not part of
make test: a harness broken by a change would otherwise surface only at the next bench)."""

from __future__ import annotations

from bench import floors


def test_the_floors_measure_each_service() -> None:
    measured = floors.run(3)
    assert measured["sqs"]["hop"]["p50"] > 0
    assert measured["postgres"]["transaction"]["p50"] > 0
    assert measured["chalice_route_in_process"]["p50"] > 0
    assert measured["redis_ping"]["p50"] > 0
    assert measured["stage_floor_ms"] > 0
