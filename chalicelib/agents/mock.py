"""The built-in mock agent: a deterministic answer derived from the capability and input.

Its delay and failure rate come from MAOF_MOCK_AGENT_DELAY_MS and
MAOF_MOCK_AGENT_FAILURE_RATE, for tests, demos and benchmarks.
"""

from __future__ import annotations

import random
import time
from typing import Any

from chalicelib.audit.chain import sha256_json
from chalicelib.config import get_settings


class MockAgentFailure(Exception):
    """The mock's configured failure rate struck."""


def call_mock_agent(agent_id: str, capability: str, stage_input: Any) -> dict[str, Any]:
    settings = get_settings()
    if settings.mock_agent_delay_ms:
        time.sleep(settings.mock_agent_delay_ms / 1000)
    if settings.mock_agent_failure_rate and random.random() < settings.mock_agent_failure_rate:
        raise MockAgentFailure("mock agent failure (MAOF_MOCK_AGENT_FAILURE_RATE)")
    digest = sha256_json(stage_input)[:12]
    return {
        "agentId": agent_id,
        "capability": capability,
        "result": f"{capability} result {digest}",
        "received": stage_input,
    }
