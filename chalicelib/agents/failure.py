"""What a failed agent call means for its stage: the kinds dispatch tells apart, and the
engine's policy (engine/policy.py) decides on."""

from __future__ import annotations

import enum


class Failure(enum.Enum):
    AGENT_RETRYABLE = "agent-retryable"  # the agent answered: try again may help
    AGENT_FINAL = "agent-final"  # the agent answered: trying again will not help
    IN_DOUBT = "in-doubt"  # timeout or lost connection: the agent may still be working
    AGENT_UNUSABLE = "agent-unusable"  # this agent cannot serve the stage: fall back
    UNEXPECTED = "unexpected"  # an exception of ours after the claim
