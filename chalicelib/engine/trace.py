"""Optional timing probes on the stage path, for benchmarks (bench/). Without a hook,
`mark` is one global lookup and a comparison: nothing is recorded, nothing is logged.

Points: `received` (the handler took the message), `claimed`, `agent-called`,
`agent-returned`, `completed` (the completion transaction committed), `sent` (the
messages of the stages it made ready are on the queue), `done`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

Hook = Callable[[str, uuid.UUID, str], None]

_hook: Hook | None = None


def set_hook(hook: Hook | None) -> None:
    """Call `hook(point, run_id, stage_id)` at every point (None: stop)."""
    global _hook
    _hook = hook


def mark(point: str, run_id: uuid.UUID, stage_id: str) -> None:
    if _hook is not None:
        _hook(point, run_id, stage_id)
