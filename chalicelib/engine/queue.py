"""Stage messages on SQS: `{runId, stageId}`, one per stage that is ready to run."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from chalicelib.aws import aws_client, stage_queue_url
from chalicelib.logs import logger

SQS_BATCH = 10


@dataclass(frozen=True)
class StageMessage:
    run_id: uuid.UUID
    stage_id: str

    def body(self) -> str:
        return json.dumps({"runId": str(self.run_id), "stageId": self.stage_id})

    @classmethod
    def parse(cls, body: str) -> StageMessage:
        """The message in an SQS record body; ValueError when it is not one of ours."""
        data: Any = json.loads(body)
        if not isinstance(data, dict) or not isinstance(data.get("stageId"), str):
            raise ValueError("not a stage message")
        return cls(uuid.UUID(str(data["runId"])), data["stageId"])


MAX_DELAY_SECONDS = 900  # SQS's limit; longer waits are re-delayed on arrival


def send_stage_messages(
    run_id: uuid.UUID, stage_ids: Sequence[str], delay_seconds: float = 0
) -> None:
    """Queue one message per stage, ten to a request, visible after `delay_seconds`.
    Raises if any could not be sent: the stages stay `queued` in the database and the
    sweeper sends them again."""
    delay = max(0, min(MAX_DELAY_SECONDS, math.ceil(delay_seconds)))
    messages = [StageMessage(run_id, stage_id) for stage_id in stage_ids]
    sqs = aws_client("sqs")
    for start in range(0, len(messages), SQS_BATCH):
        chunk = messages[start : start + SQS_BATCH]
        result = sqs.send_message_batch(
            QueueUrl=stage_queue_url(),
            Entries=[
                {"Id": str(i), "MessageBody": m.body(), "DelaySeconds": delay}
                for i, m in enumerate(chunk)
            ],
        )
        if result.get("Failed"):
            logger.error("stage messages not sent", extra={"failed": result["Failed"]})
            raise RuntimeError(f"{len(result['Failed'])} stage messages were not sent")
