"""Entry points the Lambda handlers call: a batch of stage messages, and the sweeper."""

from __future__ import annotations

import os
from typing import Any

# Fixed at import because Chalice binds the SQS trigger when the app is loaded.
STAGE_QUEUE_NAME = os.environ.get("MAOF_STAGE_QUEUE_NAME", "maof-stage-queue")


def run_stage_batch(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Run every stage message of a batch; report the ones to redeliver."""
    return {"batchItemFailures": []}


def sweep_stalled_stages() -> dict[str, Any]:
    """Re-queue stages whose message was lost or whose worker died."""
    return {"requeued": 0}
