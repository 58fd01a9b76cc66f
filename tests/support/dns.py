"""A resolver for tests: answers from a table (no answer for other names) and remembers
every question, so a test can say how often a name was looked up."""

from __future__ import annotations


class FakeResolver:
    """Stands in for `chalicelib.agents.network.resolve_host`."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def __call__(self, hostname: str, port: int) -> list[str]:
        self.asked.append(hostname)
        return list(self.answers.get(hostname, []))
