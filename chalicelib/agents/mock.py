"""The built-in mock agent: a deterministic answer derived from the capability and input.

Its delay and failure rate come from MAOF_MOCK_AGENT_DELAY_MS and
MAOF_MOCK_AGENT_FAILURE_RATE, for tests, demos and benchmarks. `mock://<name>` endpoints
are served only where mock agents are enabled: the dev and test stages, or
MAOF_MOCK_AGENTS=true.
"""

from __future__ import annotations

import random
import time
from typing import Any
from urllib.parse import urlparse

from chalicelib.audit.chain import sha256_json
from chalicelib.config import get_settings
from chalicelib.core.encoding import Unstorable, unstorable

MOCK_AGENTS_DISABLED = (
    "mock:// agents are served only in the dev and test stages, or with MAOF_MOCK_AGENTS=true"
)


class MockAgentFailure(Exception):
    """The mock's configured failure rate struck."""


def is_mock_endpoint(endpoint: str) -> bool:
    """Whether `endpoint` names a mock agent (`mock://<name>`), served here or not."""
    return urlparse(endpoint).scheme == "mock"


def mock_agents_enabled() -> bool:
    """Whether `mock://` agents may be registered and called in this stage."""
    settings = get_settings()
    return settings.is_dev or settings.mock_agents


def call_mock_agent(agent_id: str, capability: str, stage_input: Any) -> dict[str, Any]:
    settings = get_settings()
    if settings.mock_agent_delay_ms:
        time.sleep(settings.mock_agent_delay_ms / 1000)
    if settings.mock_agent_failure_rate and random.random() < settings.mock_agent_failure_rate:
        raise MockAgentFailure("mock agent failure (MAOF_MOCK_AGENT_FAILURE_RATE)")
    digest = sha256_json(stage_input)[:12]
    # The echo stops where it would nest past the output cap: in a chain of mock stages
    # each input holds the previous output, two levels deeper a stage.
    too_deep = unstorable(stage_input, settings.agent_max_output_depth - 1)
    received = stage_input
    if too_deep is not None and too_deep[0] is Unstorable.DEPTH:
        received = f"(nested too deeply to echo; sha256 {digest}…)"
    return {
        "agentId": agent_id,
        "capability": capability,
        "result": f"{capability} result {digest}",
        "received": received,
    }
