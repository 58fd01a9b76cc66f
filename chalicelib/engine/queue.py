"""Stage messages on SQS: `{runId, stageId}`, one per stage that is ready to run."""

from __future__ import annotations

import json
import math
import threading
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
        try:
            data: Any = json.loads(body)  # a JSONDecodeError is a ValueError
        except (RecursionError, TypeError):  # nested past the stack, or no text at all
            raise ValueError("not a stage message") from None
        if not isinstance(data, dict) or not isinstance(data.get("stageId"), str):
            raise ValueError("not a stage message")
        return cls(uuid.UUID(str(data["runId"])), data["stageId"])


MAX_DELAY_SECONDS = 900  # SQS's limit; longer waits are re-delayed on arrival
# The receives after which SQS moves a message to the dead-letter queue (the queues'
# maxReceiveCount, devstack's and infra/template.json's): a malformed one, visible again
# at once, gets there in seconds; a stage's, handed back through a database outage with
# a growing delay, only after about five minutes of it (RDS fails over in one or two).
MAX_RECEIVES = 20


def send_stage_messages(
    run_id: uuid.UUID, stage_ids: Sequence[str], delay_seconds: float = 0, *, fast: bool = False
) -> None:
    """Queue one message per stage, ten to a request, visible after `delay_seconds`.
    Raises if any could not be sent: the stages stay `queued` in the database and the
    sweeper sends them again.

    Sends from threads of the same process that overlap go out together (see _Outbox):
    the records of a batch finishing at once make one request, not ten. `fast` sends with
    a client that gives up within about two seconds (an API request must answer well
    within API Gateway's 29 s, and the sweeper covers what it could not send); a lone
    request sends at once, one that finds another's send in flight (the local server
    answers requests concurrently in one process) waits for it, then goes with the next."""
    delay = max(0, min(MAX_DELAY_SECONDS, math.ceil(delay_seconds)))
    entries = [(StageMessage(run_id, stage_id).body(), delay) for stage_id in stage_ids]
    if not entries:
        return
    (_FAST_OUTBOX if fast else _OUTBOX).send(entries)


@dataclass
class _Parcel:
    """One caller's messages, and how their sending ended."""

    entries: list[tuple[str, int]]  # (body, delay seconds)
    done: bool = False
    error: BaseException | None = None


class _Outbox:
    """Group commit for SQS sends. A caller whose messages find no send in flight sends
    them at once, with whatever else is waiting; one that finds a send in flight waits
    for it, then either finds its messages sent (they joined a later request) or sends
    them itself with everything that gathered meanwhile. No caller waits for more than
    the send in flight plus its own, and a lone caller never waits."""

    def __init__(self, fast_fail: bool = False) -> None:
        self.fast_fail = fast_fail  # the client that gives up within about two seconds
        self._cond = threading.Condition()
        self._waiting: list[_Parcel] = []
        self._sending = False

    def send(self, entries: list[tuple[str, int]]) -> None:
        mine = _Parcel(entries)
        with self._cond:
            self._waiting.append(mine)
            while self._sending and not mine.done:
                self._cond.wait()
            if not mine.done:
                self._sending = True
                parcels, self._waiting = self._waiting, []
        if not mine.done:
            try:
                _send_parcels(parcels, fast_fail=self.fast_fail)
            finally:
                with self._cond:
                    self._sending = False
                    self._cond.notify_all()
        if mine.error is not None:
            raise mine.error


def _send_parcels(parcels: list[_Parcel], *, fast_fail: bool = False) -> None:
    """Send every parcel's messages, ten to a request; mark each parcel done, with the
    error that kept any of its messages from the queue."""
    flat = [(parcel, entry) for parcel in parcels for entry in parcel.entries]
    try:
        sqs = aws_client("sqs", fast_fail=fast_fail)
        for start in range(0, len(flat), SQS_BATCH):
            chunk = flat[start : start + SQS_BATCH]
            try:
                result = sqs.send_message_batch(
                    QueueUrl=stage_queue_url(),
                    Entries=[
                        {"Id": str(i), "MessageBody": body, "DelaySeconds": delay}
                        for i, (_, (body, delay)) in enumerate(chunk)
                    ],
                )
            except Exception as exc:
                for parcel, _ in chunk:
                    parcel.error = parcel.error or exc
                continue
            if result.get("Failed"):
                logger.error("stage messages not sent", extra={"failed": result["Failed"]})
                unsent: dict[int, int] = {}
                for item in result["Failed"]:
                    parcel = chunk[int(item["Id"])][0]
                    unsent[id(parcel)] = unsent.get(id(parcel), 0) + 1
                for parcel, _ in chunk:
                    if id(parcel) in unsent and parcel.error is None:
                        parcel.error = RuntimeError(
                            f"{unsent[id(parcel)]} stage messages were not sent"
                        )
    except BaseException as exc:
        for parcel in parcels:
            parcel.error = parcel.error or exc
        raise
    finally:
        for parcel in parcels:
            parcel.done = True


_OUTBOX = _Outbox()
_FAST_OUTBOX = _Outbox(fast_fail=True)


def change_visibility(entries: Sequence[tuple[str, int]]) -> None:
    """Make received messages (by receipt handle) visible again after their seconds."""
    sqs = aws_client("sqs")
    for start in range(0, len(entries), SQS_BATCH):
        chunk = entries[start : start + SQS_BATCH]
        sqs.change_message_visibility_batch(
            QueueUrl=stage_queue_url(),
            Entries=[
                {"Id": str(i), "ReceiptHandle": handle, "VisibilityTimeout": seconds}
                for i, (handle, seconds) in enumerate(chunk)
            ],
        )
