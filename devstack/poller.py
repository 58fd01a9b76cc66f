"""The local event source: long-polls the stage queue and invokes `run_stage` with real
Lambda SQS events, and runs the scheduled handlers on their schedule (dev and tests only).

As Lambda's SQS event source mapping does, receiving and executing are apart: a few
receivers long-poll the queue and hand each batch to an execution of the handler (a
thread standing in for one concurrent Lambda execution), up to `concurrency` at once;
each execution deletes what succeeded and leaves what failed for redelivery after the
visibility timeout. A receiver takes messages only when an execution is free for them,
so none waits received while its visibility timeout runs. An execution that is busy for
long (handing freed agent slots on to waiting stages) keeps no other message waiting
while executions are free.

LocalStack keeps no state across a restart: when a receive fails, a ResourceKeeper checks
(at most every few seconds) whether the queue is gone and, if so, creates the queues and
the bucket again the way `make dev` did, re-publishing the dashboard when its bucket went.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from chalicelib.aws import aws_client, stage_queue_url
from chalicelib.config import ConfigError, Settings, get_settings, reset_settings
from chalicelib.logs import logger

Handler = Callable[[dict[str, Any], Any], Any]

# Long polls kept on the queue at once (Lambda starts with five for a queue, for any
# number of executions). Each brings up to a batch; when a receive takes tens of
# milliseconds (LocalStack on a busy machine), fewer than four refill the executions
# too slowly, while each more costs an idle queue one more waiting request.
RECEIVERS = 4


class LambdaContext:
    """The parts of the Lambda context object our handlers use."""

    def __init__(self, function_name: str, timeout_seconds: float = 60.0) -> None:
        self.function_name = function_name
        self.aws_request_id = str(uuid.uuid4())
        self.memory_limit_in_mb = 512
        self._deadline = time.monotonic() + timeout_seconds

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def sqs_event(messages: list[dict[str, Any]], queue_arn: str, region: str) -> dict[str, Any]:
    """The event Lambda's SQS event source mapping delivers for `messages`."""
    return {
        "Records": [
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "attributes": m.get("Attributes", {}),
                "messageAttributes": m.get("MessageAttributes", {}),
                "md5OfBody": m.get("MD5OfBody") or hashlib.md5(m["Body"].encode()).hexdigest(),  # noqa: S324
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": region,
            }
            for m in messages
        ]
    }


def scheduled_event(rule: str, region: str) -> dict[str, Any]:
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "000000000000",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "region": region,
        "resources": [f"arn:aws:events:{region}:000000000000:rule/{rule}"],
        "detail": {},
    }


# How often, at most, a failing poller looks for lost resources (each look is two requests).
HEAL_INTERVAL_SECONDS = 2.0
_MISSING_QUEUE_CODES = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})
_MISSING_BUCKET_CODES = frozenset({"404", "NoSuchBucket", "NotFound"})


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


class ResourceKeeper:
    """Re-creates the stage queue (+ DLQ) and the dashboard bucket when LocalStack lost them.

    `heal()` is called after an SQS call failed. At most once per `interval` seconds it asks
    for the queue; when LocalStack answers that it does not exist (a restart: LocalStack
    keeps nothing), it runs `stack.ensure_resources` and, if the bucket was gone too and an
    API URL is known, uploads the dashboard again. While LocalStack does not answer at all,
    it does nothing and the next failure looks again.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        api_url: str | None = None,
        interval: float = HEAL_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings or get_settings()
        self.api_url = api_url
        self.interval = interval
        self.clock = clock
        self.checks = 0
        self.recreated = 0
        self.republished = 0
        self._lock = threading.Lock()
        self._last_check: float | None = None

    def heal(self) -> bool:
        """Re-create what is missing, if it is time to look; True when it re-created them."""
        if not self._lock.acquire(blocking=False):
            return False  # another worker is looking right now
        try:
            now = self.clock()
            if self._last_check is not None and now - self._last_check < self.interval:
                return False
            self._last_check = now
            self.checks += 1
            return self._heal()
        finally:
            self._lock.release()

    def _heal(self) -> bool:
        from devstack.stack import ensure_resources

        try:
            if not self._queue_missing():
                return False
            bucket_missing = self._bucket_missing()
            ensure_resources(self.settings)
        except Exception as exc:  # LocalStack still away, or half up: look again later
            logger.warning("poller could not check its resources", extra={"error": repr(exc)})
            return False
        self.recreated += 1
        logger.warning(
            "the stage queue was gone (LocalStack restarted?): re-created queues and bucket",
            extra={"queue": self.settings.stage_queue_name},
        )
        if bucket_missing and self.api_url:
            from devstack import dashboard

            try:
                dashboard.upload_site(self.api_url, bucket=self.settings.dashboard_bucket)
            except Exception as exc:
                logger.warning("dashboard not re-published", extra={"error": repr(exc)})
            else:
                self.republished += 1
        return True

    def _queue_missing(self) -> bool:
        try:
            aws_client("sqs").get_queue_url(QueueName=self.settings.stage_queue_name)
        except Exception as exc:
            if _error_code(exc) in _MISSING_QUEUE_CODES:
                return True
            raise
        return False

    def _bucket_missing(self) -> bool:
        try:
            aws_client("s3").head_bucket(Bucket=self.settings.dashboard_bucket)
        except Exception as exc:
            if _error_code(exc) in _MISSING_BUCKET_CODES:
                return True
            raise
        return False


class Poller:
    """Receivers that drain the stage queue into up to `concurrency` executions of
    `handler` at once, plus a schedule thread."""

    def __init__(
        self,
        handler: Handler,
        schedules: list[tuple[str, Handler, float]] | None = None,
        concurrency: int | None = None,
        batch_size: int | None = None,
        wait_seconds: int | None = None,
        keeper: ResourceKeeper | None = None,
    ) -> None:
        settings = get_settings()
        self.keeper = keeper
        self.handler = handler
        self.schedules = schedules or []
        self.concurrency = concurrency or settings.poller_concurrency
        self.batch_size = batch_size or settings.poller_batch_size
        self.wait_seconds = settings.poller_wait_seconds if wait_seconds is None else wait_seconds
        self.region = settings.aws_region
        self.queue_url = stage_queue_url()
        self.queue_arn = aws_client("sqs").get_queue_attributes(
            QueueUrl=self.queue_url, AttributeNames=["QueueArn"]
        )["Attributes"]["QueueArn"]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._free = threading.BoundedSemaphore(self.concurrency)  # executions not running
        self._executions = ThreadPoolExecutor(self.concurrency, thread_name_prefix="execution")
        self.invocations = 0
        self.failures = 0  # records the handler reported failed (or all, when it raised)
        self.undeleted = 0  # handled records whose delete SQS refused twice
        self._lock = threading.Lock()

    def start(self) -> Poller:
        for index in range(min(RECEIVERS, self.concurrency)):
            self._spawn(self._drain, f"poller-{index}")
        for name, handler, interval in self.schedules:
            self._spawn(functools.partial(self._every, name, handler, interval), f"schedule-{name}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop receiving, and wait (up to `timeout`) for the executions in flight."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for _ in range(self.concurrency):
            if not self._free.acquire(timeout=max(0.0, deadline - time.monotonic())):
                break
        self._executions.shutdown(wait=False)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _drain(self) -> None:
        sqs = aws_client("sqs")
        while not self._stop.is_set():
            if not self._free.acquire(timeout=0.5):
                continue  # every execution is busy: take no message it cannot start on
            messages: list[dict[str, Any]] = []
            try:
                received = sqs.receive_message(
                    QueueUrl=self.queue_url,
                    MaxNumberOfMessages=self.batch_size,
                    WaitTimeSeconds=self.wait_seconds,
                    AttributeNames=["All"],
                    MessageAttributeNames=["All"],
                )
                messages = received.get("Messages", [])
                if messages:
                    self._executions.submit(self._execute, messages)
            except Exception as exc:
                messages = []
                logger.warning("poller receive failed", extra={"error": repr(exc)})
                if self.keeper is None or not self.keeper.heal():
                    self._stop.wait(1.0)
            finally:
                if not messages:
                    self._free.release()

    def _execute(self, messages: list[dict[str, Any]]) -> None:
        try:
            self.deliver(messages)
        except Exception as exc:  # the delete failed: the messages come back, as on Lambda
            logger.warning("poller delete failed", extra={"error": repr(exc)})
            if self.keeper is not None:
                self.keeper.heal()
        finally:
            self._free.release()

    def deliver(self, messages: list[dict[str, Any]]) -> None:
        """Invoke the handler with one batch; delete what it did not report as failed."""
        event = sqs_event(messages, self.queue_arn, self.region)
        failed: set[str] = set()
        try:
            context = LambdaContext("run_stage", get_settings().run_stage_timeout_seconds)
            result = self.handler(event, context)
            for item in (result or {}).get("batchItemFailures", []):
                failed.add(item["itemIdentifier"])
        except Exception as exc:
            # A Lambda that raises fails the whole batch: everything is redelivered.
            logger.exception("run_stage raised", extra={"error": repr(exc)})
            failed = {m["MessageId"] for m in messages}
        done = [m for m in messages if m["MessageId"] not in failed]
        with self._lock:
            self.invocations += 1
            self.failures += len(failed)
        if done:
            self.delete_handled(done)

    def delete_handled(self, messages: list[dict[str, Any]]) -> None:
        """Delete handled messages. SQS answers a delete it could not do in the batch's
        `Failed` list, not as an error: those are logged and tried once more; what is still
        not deleted comes back after the visibility timeout (and runs again), counted in
        `undeleted`."""
        entries = {
            str(index): {"Id": str(index), "ReceiptHandle": m["ReceiptHandle"]}
            for index, m in enumerate(messages)
        }
        message_ids = {str(index): m["MessageId"] for index, m in enumerate(messages)}
        for attempt in (1, 2):
            answer = aws_client("sqs").delete_message_batch(
                QueueUrl=self.queue_url, Entries=list(entries.values())
            )
            refused = [f for f in answer.get("Failed") or [] if f.get("Id") in entries]
            if not refused:
                return
            details = {
                "queue": self.queue_url,
                "failed": [
                    {
                        "messageId": message_ids[f["Id"]],
                        "code": f.get("Code"),
                        "senderFault": f.get("SenderFault"),
                        "message": f.get("Message"),
                    }
                    for f in refused
                ],
            }
            if attempt == 1:
                logger.warning(
                    "poller delete refused some messages: trying them again", extra=details
                )
                entries = {f["Id"]: entries[f["Id"]] for f in refused}
            else:
                logger.error(
                    "poller could not delete some messages: they will be delivered again",
                    extra=details,
                )
                with self._lock:
                    self.undeleted += len(refused)

    def _every(self, name: str, handler: Handler, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                handler(scheduled_event(name, self.region), LambdaContext(name))
            except Exception as exc:
                logger.exception(
                    "scheduled handler raised", extra={"rule": name, "error": repr(exc)}
                )


def from_app(
    concurrency: int | None = None, api_url: str | None = None, helper: bool = False
) -> Poller:
    """A poller wired to the Chalice app's own handlers and schedules, re-creating the
    local resources when LocalStack loses them (the dashboard too, when `api_url` names the
    API). A `helper` (a second process of the same poller) only drains the queue: one
    process runs the schedules, and one re-creates what LocalStack lost (two would race:
    one could re-create the bucket empty, the other then find it there and not re-publish)."""
    import app as maof

    settings = get_settings()
    scheduled: list[tuple[str, Handler, float]] = [
        (name, maof.app.handler_map[name], float(interval))
        for name, interval in (
            ("sweep_stalled_stages", settings.sweep_interval_seconds),
            ("check_agent_health", settings.agent_health_interval_seconds),
            ("write_audit_checkpoint", settings.audit_checkpoint_interval_seconds),
        )
        if not helper and name in maof.app.handler_map
    ]
    keeper = None if helper else ResourceKeeper(settings, api_url)
    return Poller(
        maof.app.handler_map["run_stage"], scheduled, concurrency=concurrency, keeper=keeper
    )


# Database connections the poller process keeps per execution it may run. Deployed, each
# run_stage execution keeps up to 10 (+5) of its own; here one process stands in for all
# of them, and past the pool every connection is opened and closed again for each use (a
# new Postgres backend each time): with make dev's 16 executions, a pool of 10 opened 768
# connections in one 200-run drain and cost a third of its throughput.
CONNECTIONS_PER_EXECUTION = 2


def pool_size(configured: str | None, concurrency: int) -> int:
    """The connections a poller process of `concurrency` executions keeps: MAOF_DB_POOL_SIZE
    if set (empty is unset, as everywhere in the settings), else CONNECTIONS_PER_EXECUTION
    per execution."""
    return int(configured) if configured else min(100, CONNECTIONS_PER_EXECUTION * concurrency)


def size_database_pool(environ: MutableMapping[str, str], concurrency: int) -> None:
    """Set MAOF_DB_POOL_SIZE to pool_size() for this process, unless it is set."""
    if not environ.get("MAOF_DB_POOL_SIZE"):
        environ["MAOF_DB_POOL_SIZE"] = str(pool_size(None, concurrency))
        reset_settings()


def shares(total: int, processes: int) -> list[int]:
    """`total` executions over at most `processes` processes, as evenly as they go."""
    count = max(1, min(processes, total))
    return [total // count + (1 if index < total % count else 0) for index in range(count)]


def start_helpers(executions: list[int]) -> list[subprocess.Popen[bytes]]:
    """One helper process per entry: it drains the queue with that many executions, runs no
    schedules, and exits as soon as this process is gone (killed too: then it is a crash,
    with no cleanup, as a killed Lambda's)."""
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "devstack.poller",
                "--concurrency",
                str(count),
                "--helper-of",
                str(os.getpid()),
            ]
        )
        for count in executions
    ]


def _exit_with(parent: int) -> None:
    """Watch the process that started this helper: when it is gone, exit at once."""
    while os.getppid() == parent:
        time.sleep(0.1)
    os._exit(1)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.poller")
    parser.add_argument("--concurrency", type=int, default=None, help="executions in all")
    parser.add_argument(
        "--api-url", default=None, help="the API the dashboard names, to re-publish it"
    )
    parser.add_argument("--helper-of", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    helpers: list[subprocess.Popen[bytes]] = []
    try:
        settings = get_settings()
        if args.helper_of is not None:
            threading.Thread(target=_exit_with, args=(args.helper_of,), daemon=True).start()
            mine = [args.concurrency or settings.poller_concurrency]
        else:
            total = args.concurrency or settings.poller_concurrency
            mine = shares(total, settings.poller_processes)
            helpers = start_helpers(mine[1:])
        kept = sum(pool_size(os.environ.get("MAOF_DB_POOL_SIZE"), share) for share in mine)
        size_database_pool(os.environ, mine[0])
        poller = from_app(mine[0], args.api_url, helper=args.helper_of is not None).start()
    except ConfigError as exc:
        print(f"maof: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.helper_of is None:
        print(
            f"poller: draining {poller.queue_url} with up to {sum(mine)} executions, "
            f"batches of up to {poller.batch_size}, {poller.wait_seconds} s long polls, "
            f"{kept} database connections kept, in {len(mine)} process(es)",
            flush=True,
        )
    # Stopped (Ctrl-C, or make dev's SIGTERM), it lets its receives return before it exits:
    # a long poll cut off mid-wait stays open in SQS (LocalStack too) and takes the next
    # messages for a client that is gone, where they sit until the visibility timeout.
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    status = 0
    try:
        while not stopping.wait(0.5):
            if any(helper.poll() is not None for helper in helpers):
                print("poller: a helper process exited; stopping", file=sys.stderr, flush=True)
                status = 1
                break
    except KeyboardInterrupt:
        pass
    for helper in helpers:
        if helper.poll() is None:
            helper.terminate()
    poller.stop(timeout=poller.wait_seconds + 5.0)
    for helper in helpers:
        try:
            helper.wait(poller.wait_seconds + 10.0)
        except subprocess.TimeoutExpired:
            helper.kill()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
