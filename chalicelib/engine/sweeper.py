"""The scheduled sweeper: no accepted run is stranded by a lost message or a dead worker,
and a backlog is never duplicated.

A stage `in_progress` whose lease ran out lost its worker (killed, out of time, cut off
from the database: leases.py): it is queued again under the same attempt, at most
MAOF_STAGE_MAX_LEASE_EXPIRIES times, then failed. It keeps its claim token until another
worker claims it: a worker that was only late and gets its agent's answer first still
ends the stage with it (stages.py), rather than have the agent called again.

A stage `queued` and due for a while without being claimed lost its message (a crash between commit and send, a queue that
was recreated empty): it is sent again, at most MAOF_STAGE_MAX_REQUEUES times. How long
"a while" is depends on the queue: when it holds nothing to deliver, no message can be
on its way, so MAOF_SWEEP_QUEUED_AFTER_SECONDS suffices; behind a backlog, a stage's
message may simply not have come up yet, so MAOF_SWEEP_BACKLOG_AFTER_SECONDS applies, and
a re-send then is not counted (the message may still be in line: a long backlog is no
lost message; the duplicate is harmless, a stage runs once whatever its deliveries). A
depth SQS will not tell (throttled, too slow) is taken for a backlog: the backlog's
grace and uncounted re-sends, rather than duplicate a queue that may be long (each
re-send adding to the load SQS refused) and charge every stage behind it with a lost
message; a message lost meanwhile is re-sent after the longer grace.
Stages left queued or in progress in a run that has ended are skipped. A stage waiting
for an agent's slot is handed one by the worker that frees it; one that has waited
MAOF_SWEEP_QUEUED_AFTER_SECONDS without, while a slot is free for it (its hand-off was
lost, a dead worker's slot lease ran out) or its agents left, or that has waited
MAOF_SWEEP_BACKLOG_AFTER_SECONDS in any case, is woken: queued again, to look for a slot
afresh (or wait again, counted). A woken stage whose message SQS would not take waits
again as it was, for the next round to wake (left queued, it would be charged with a lost
message).

Runs past their deadline (workflow.timeoutMs) fail, and completion callbacks that are due
are delivered (engine/callbacks.py), on every sweep: neither waits for a client.

Each run is swept in its own transaction (the run row locked first, as everywhere); an
error on one run is logged and the sweep goes on with the others.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from chalicelib import observability
from chalicelib.agents.candidates import unshare_former_admins
from chalicelib.agents.selection import may_have_room_each
from chalicelib.audit import chain
from chalicelib.aws import aws_client, stage_queue_url
from chalicelib.config import get_settings
from chalicelib.db import session_scope
from chalicelib.db.models import SUBMISSION_KEY_DAYS
from chalicelib.engine import callbacks
from chalicelib.engine.queue import send_stage_messages
from chalicelib.engine.stages import (
    LockedRun,
    ended_stage_status,
    expire_run,
    lock_run,
    record_failure,
)
from chalicelib.logs import logger

BATCH_LIMIT = 500
# EventBridge runs a schedule at most once a minute: in Lambda one invocation sweeps every
# MAOF_SWEEP_INTERVAL_SECONDS for about that minute (the local poller calls it that often).
SCHEDULE_PERIOD_SECONDS = 60
# The sweep_stalled_stages function's timeout (.chalice/config.json), for a handler given
# no Lambda context; and how long before it a sweep's last callback try ends: time to
# record its outcome and return.
FUNCTION_TIMEOUT_SECONDS = 60
FUNCTION_MARGIN_SECONDS = 5


def queue_backlog() -> int | None:
    """Messages waiting to be delivered from the stage queue; None if SQS cannot say. Not
    the delayed ones: each is for a stage not due yet (a backoff, a hand-back a few seconds
    long), never the lost message of one that is, and any run's retry (or anyone's delayed
    send) would otherwise put every lost message on the backlog's grace."""
    try:
        attributes = aws_client("sqs", fast_fail=True).get_queue_attributes(
            QueueUrl=stage_queue_url(), AttributeNames=["ApproximateNumberOfMessages"]
        )["Attributes"]
    except Exception as exc:
        logger.warning("queue depth unavailable", extra={"error": type(exc).__name__})
        return None
    return int(attributes.get("ApproximateNumberOfMessages", 0))


def grace_for(backlog: int | None) -> timedelta:
    """How long a queued stage waits for its message before it is re-sent: the short grace
    only when the queue is known to hold nothing to deliver (`backlog` 0); behind a backlog,
    or one that may be (None: the depth is unknown), the backlog's."""
    settings = get_settings()
    seconds = (
        settings.sweep_queued_after_seconds
        if backlog == 0
        else max(settings.sweep_queued_after_seconds, settings.sweep_backlog_after_seconds)
    )
    return timedelta(seconds=seconds)


_STALLED = """
    (s.status = 'queued' AND s.queued_at <= now() - :grace
         AND (s.not_before IS NULL OR s.not_before <= now() - :grace))
    OR (s.status = 'in_progress' AND s.lease_expires_at <= now())
"""


def find_stalled(grace: timedelta) -> dict[uuid.UUID, list[str]]:
    """Stalled stages by run, at most BATCH_LIMIT, those stalled longest first (so a
    backlog larger than one sweep is worked off in order, none left behind by the rest);
    read without locks, each is re-checked under the run lock."""
    with session_scope() as session:
        rows = session.execute(
            text(
                f"""
                SELECT s.run_id, s.stage_id FROM stage_executions AS s WHERE {_STALLED}
                 ORDER BY CASE WHEN s.status = 'in_progress' THEN s.lease_expires_at
                               ELSE GREATEST(s.queued_at, s.not_before) END
                 LIMIT :limit
                """
            ),
            {"grace": grace, "limit": BATCH_LIMIT},
        ).all()
    stalled: dict[uuid.UUID, list[str]] = defaultdict(list)
    for row in rows:
        stalled[row.run_id].append(row.stage_id)
    return stalled


@dataclass
class Swept:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def sweep_run(
    run_id: uuid.UUID, stage_ids: list[str], grace: timedelta, backlog: int | None = 0
) -> Swept:
    """Under the run's lock: re-queue, fail (past a ceiling) or skip (run ended) each of
    its still-stalled stages, with an audit entry each. The caller sends `requeued`. A
    queued stage re-sent unless the queue is known to be empty (`backlog` > 0, or None:
    unknown) is not counted toward MAOF_STAGE_MAX_REQUEUES (nor failed by it): its message
    may be in line."""
    settings = get_settings()
    swept = Swept()
    with session_scope() as session:
        run = lock_run(session, run_id)
        rows = session.execute(
            text(
                f"""
                SELECT s.id, s.stage_id, s.stage_name, s.status, s.attempt, s.agent_id,
                       s.lease_expiries, s.requeues
                  FROM stage_executions AS s
                 WHERE s.run_id = :run_id AND s.stage_id = ANY (:stage_ids) AND ({_STALLED})
                 ORDER BY s.position
                   FOR UPDATE
                """
            ),
            {"run_id": run_id, "stage_ids": stage_ids, "grace": grace},
        ).all()
        for row in rows:
            if not run.live:
                _skip(session, run, row)
                swept.skipped.append(row.stage_id)
                continue
            expired = row.status == "in_progress"
            # A backlog (or a depth unknown) is no proof of loss; a lease that ran out is,
            # backlog or not.
            counted = expired or backlog == 0
            count = (row.lease_expiries if expired else row.requeues) + int(counted)
            ceiling = settings.stage_max_lease_expiries if expired else settings.stage_max_requeues
            if count > ceiling:
                _fail(session, run, row, expired, count - 1)
                swept.failed.append(row.stage_id)
                run = LockedRun(run.id, "failed", run.output_bytes)  # the rest are skipped
                continue
            # The claim token stays: the next claim replaces it (see above).
            session.execute(
                text(
                    "UPDATE stage_executions SET status = 'queued', queued_at = now(), "
                    "lease_expires_at = NULL, "
                    "lease_expiries = lease_expiries + :expired, requeues = requeues + :lost "
                    "WHERE id = :id"
                ),
                {"id": row.id, "expired": int(expired), "lost": int(counted and not expired)},
            )
            chain.append(
                session,
                run_id,
                "requeue",
                "queued",
                stage_id=row.stage_id,
                details={
                    "reason": "lease expired" if expired else "message not consumed",
                    "attempt": row.attempt,
                    "count": count,
                    "counted": counted,
                },
            )
            swept.requeued.append(row.stage_id)
    return swept


def _skip(session: Session, run: LockedRun, row: Any) -> None:
    status = ended_stage_status(run.status)  # as the stage's own worker would end it
    skipped = session.execute(
        text(
            "UPDATE stage_executions SET status = :status, completed_at = now(), "
            "lease_expires_at = NULL, claim_token = NULL "
            "WHERE id = :id AND status IN ('queued', 'in_progress') RETURNING id"
        ),
        {"id": row.id, "status": status},
    ).first()
    if skipped is None:
        return  # skipped already, with the stage that failed the run
    chain.append(
        session,
        run.id,
        "skip",
        status,
        stage_id=row.stage_id,
        details={"reason": f"the run is {run.status}"},
    )


def _fail(session: Session, run: LockedRun, row: Any, expired: bool, times: int) -> None:
    if expired:
        reason = (
            f"its worker stopped {times} times before finishing (killed, out of time, or cut "
            "off from the database; MAOF_STAGE_MAX_LEASE_EXPIRIES)"
        )
    else:
        reason = f"its message was lost {times} times (MAOF_STAGE_MAX_REQUEUES)"
    session.execute(
        text(
            "UPDATE stage_executions SET status = 'failed', error_message = :reason, "
            "completed_at = now(), lease_expires_at = NULL, claim_token = NULL WHERE id = :id"
        ),
        {"id": row.id, "reason": reason},
    )
    record_failure(session, run, row.stage_id, row.stage_name, reason, row.agent_id, row.attempt)


# Stages woken a round: those a slot may be free for; then, of those waiting past
# MAOF_SWEEP_BACKLOG_AFTER_SECONDS whatever the counts say, a smaller batch. Each batch
# takes each user's oldest in turn: one user's backlog, behind their own full agents (or
# woken for a free slot on an agent their stages already tried, to wait again), never
# takes the round from another user's stages, nor the long waits from stages that can run.
WAKE_LIMIT = 200
LONG_WAIT_WAKE_LIMIT = 50

# The stages woken from waiting that `{condition}` admits, each user's oldest in turn, up
# to :limit, each locked first (SKIP LOCKED: a stage being claimed meanwhile is left to its
# claim); with the queued_at each had while it waited, and the one it has now.
_WAKE_SQL = """
    UPDATE stage_executions AS t SET status = 'queued', queued_at = now()
      FROM (SELECT s.id, s.queued_at FROM stage_executions AS s
             WHERE s.status = 'waiting' AND s.id IN (
                   SELECT id FROM (
                       SELECT s.id, s.parked_at, row_number() OVER (
                                  PARTITION BY r.user_id ORDER BY s.parked_at) AS turn
                         FROM stage_executions AS s
                         JOIN workflow_runs AS r ON r.id = s.run_id
                        WHERE s.status = 'waiting' AND {condition}) AS due
                    ORDER BY turn, parked_at LIMIT :limit)
               FOR UPDATE OF s SKIP LOCKED) AS was
     WHERE t.id = was.id
 RETURNING t.run_id, t.stage_id, was.queued_at AS waiting_since, t.queued_at AS woken_at
"""
_WAKE_WITH_ROOM = text(
    _WAKE_SQL.format(
        condition="""s.queued_at <= now() - :grace
                                AND (s.capability, r.user_id) IN (SELECT * FROM unnest(
                                    CAST(:capabilities AS text[]), CAST(:owners AS uuid[])))"""
    )
)
_WAKE_LONG_WAITING = text(_WAKE_SQL.format(condition="s.queued_at <= now() - :long_wait"))


@dataclass(frozen=True)
class Woken:
    """A stage wake_waiting queued again: `waiting_since` its queued_at while it waited,
    `woken_at` the one it was given (see put_back_waiting)."""

    stage_id: str
    waiting_since: datetime
    woken_at: datetime


def wake_waiting() -> dict[uuid.UUID, list[Woken]]:
    """Queue again the stages that have waited for a slot longer than the short grace,
    where a slot may be free for them (may_have_room_each, for their run's owner), up to
    WAKE_LIMIT; then up to LONG_WAIT_WAKE_LIMIT of those that have waited longer than
    MAOF_SWEEP_BACKLOG_AFTER_SECONDS whatever the counts say; each batch each user's
    oldest in turn (so a wait the hand-offs cannot end, e.g. behind agents the stage
    already tried, still ends: it looks afresh and fails, or waits again, counted). While
    every agent that may serve a stage is full, each release hands its slot to the next of
    them: woken, they would only go round the queue to wait again (and crowd out the
    stages that can run)."""
    settings = get_settings()
    grace = timedelta(seconds=settings.sweep_queued_after_seconds)
    long_wait = timedelta(
        seconds=max(settings.sweep_queued_after_seconds, settings.sweep_backlog_after_seconds)
    )
    with session_scope() as session:
        waited = session.execute(
            text(
                "SELECT DISTINCT s.capability, r.user_id FROM stage_executions AS s "
                "JOIN workflow_runs AS r ON r.id = s.run_id "
                "WHERE s.status = 'waiting' AND s.queued_at <= now() - :grace"
            ),
            {"grace": grace},
        ).all()
        pairs = [(row.capability, row.user_id) for row in waited]
        room = [pair for pair, free in zip(pairs, may_have_room_each(pairs), strict=True) if free]
        with_room = session.execute(
            _WAKE_WITH_ROOM,
            {
                "grace": grace,
                "limit": WAKE_LIMIT,
                "capabilities": [capability for capability, _ in room],
                "owners": [owner for _, owner in room],
            },
        ).all()
        # Those just woken are queued now, and not picked again.
        long_waiting = session.execute(
            _WAKE_LONG_WAITING, {"long_wait": long_wait, "limit": LONG_WAIT_WAKE_LIMIT}
        ).all()
    woken: dict[uuid.UUID, list[Woken]] = defaultdict(list)
    for row in [*with_room, *long_waiting]:
        woken[row.run_id].append(Woken(row.stage_id, row.waiting_since, row.woken_at))
    return woken


def put_back_waiting(run_id: uuid.UUID, woken: list[Woken]) -> list[str]:
    """Put woken stages whose message was not sent back to waiting as they were (their
    queued_at too: their wait and place, for the next round to wake them again), unless
    claimed, ended or queued again since (their queued_at is no longer the wake's): a
    message SQS took after all is then dropped by its worker, and the stage woken again.
    Returns the stages put back."""
    with session_scope() as session:
        rows = session.execute(
            text(
                """
                UPDATE stage_executions AS s
                   SET status = 'waiting', queued_at = back.waiting_since
                  FROM unnest(CAST(:stage_ids AS text[]), CAST(:since AS timestamptz[]),
                              CAST(:woken_at AS timestamptz[]))
                       AS back(stage_id, waiting_since, woken_at)
                 WHERE s.run_id = :run_id AND s.stage_id = back.stage_id
                   AND s.status = 'queued' AND s.queued_at = back.woken_at
             RETURNING s.stage_id
                """
            ),
            {
                "run_id": run_id,
                "stage_ids": [w.stage_id for w in woken],
                "since": [w.waiting_since for w in woken],
                "woken_at": [w.woken_at for w in woken],
            },
        ).all()
    return [row.stage_id for row in rows]


def overdue_runs() -> list[uuid.UUID]:
    """Live runs past their deadline (workflow.timeoutMs)."""
    with session_scope() as session:
        return list(
            session.execute(
                text(
                    "SELECT id FROM workflow_runs WHERE status IN ('queued', 'in_progress') "
                    "AND deadline_at <= now() ORDER BY deadline_at LIMIT :limit"
                ),
                {"limit": BATCH_LIMIT},
            ).scalars()
        )


# Rows deleted per table per sweep: a backlog (a first sweep after an upgrade) goes over
# a few sweeps, none holding the database for long.
PRUNE_BATCH = 1000
# A session is deleted this long after it expired: its tokens have been refused since.
SESSION_KEPT_AFTER_EXPIRY = "1 day"


def prune_expired() -> int:
    """Delete Idempotency-Keys past SUBMISSION_KEY_DAYS (forgotten already: a submission
    with one is a new one) and sign-in sessions expired a day ago (their tokens refused);
    at most PRUNE_BATCH of each, oldest first, by their age indexes. Returns how many."""
    deleted = 0
    with session_scope() as session:
        for table, column, cutoff in (
            ("submission_keys", "created_at", f"make_interval(days => {SUBMISSION_KEY_DAYS})"),
            ("auth_sessions", "expires_at", f"interval '{SESSION_KEPT_AFTER_EXPIRY}'"),
        ):
            deleted += len(
                session.execute(
                    text(
                        f"DELETE FROM {table} WHERE ctid IN (SELECT ctid FROM {table} "
                        f"WHERE {column} < now() - {cutoff} ORDER BY {column} "
                        f"LIMIT {PRUNE_BATCH} FOR UPDATE SKIP LOCKED) RETURNING 1"
                    )
                ).all()
            )
    return deleted


def sweep_once(until: float | None = None) -> dict[str, int]:
    """One sweep: the agents of accounts no longer named admins unshared; runs past their
    deadline failed; every stalled stage re-queued and re-sent, failed or skipped; stages
    waiting too long for a slot woken; due completion callbacks delivered, batch after
    batch until `until` (time.monotonic()) is near."""
    backlog = queue_backlog()
    grace = grace_for(backlog)
    # Measured before stages are re-sent: a re-send restarts their wait (queued_at), and the
    # age measured after it never passed the sweeper's own grace (nor the alarm's threshold).
    oldest = _oldest_queued_age_or_none()
    totals = {
        "expired": 0,
        "requeued": 0,
        "failed": 0,
        "skipped": 0,
        "woken": 0,
        "callbacks": 0,
        "unshared": 0,
        "pruned": 0,
        "errors": 0,
    }
    try:
        totals["unshared"] = unshare_former_admins()
    except Exception:
        logger.exception("unsharing the agents of former admins failed; going on")
        totals["errors"] += 1
    try:
        totals["pruned"] = prune_expired()
    except Exception:
        logger.exception("deleting expired keys and sessions failed; going on")
        totals["errors"] += 1
    for run_id in overdue_runs():
        try:
            totals["expired"] += int(expire_run(run_id))
        except Exception:
            logger.exception("expiring a run failed; going on", extra={"runId": str(run_id)})
            totals["errors"] += 1
    try:
        woken = wake_waiting()
    except Exception:
        logger.exception("waking waiting stages failed; going on")
        totals["errors"] += 1
        woken = {}
    for run_id, stages_woken in woken.items():
        try:
            send_stage_messages(run_id, [w.stage_id for w in stages_woken])
        except Exception:
            logger.exception(
                "sending woken stages failed; they wait again", extra={"runId": str(run_id)}
            )
            totals["errors"] += 1
            _put_back_quietly(run_id, stages_woken)
            continue
        totals["woken"] += len(stages_woken)
    for run_id, stage_ids in find_stalled(grace).items():
        try:
            swept = sweep_run(run_id, stage_ids, grace, backlog)
        except Exception:
            logger.exception("sweeping a run failed; going on", extra={"runId": str(run_id)})
            totals["errors"] += 1
            continue
        # Committed, with its audit entries: counted whether or not the send goes through
        # (one that fails leaves the stage queued, for the next sweep to send).
        totals["requeued"] += len(swept.requeued)
        if swept.requeued:
            try:
                send_stage_messages(run_id, swept.requeued)
            except Exception:
                logger.exception(
                    "sending requeued stages failed; going on", extra={"runId": str(run_id)}
                )
                totals["errors"] += 1
        totals["failed"] += len(swept.failed)
        for stage_id in swept.failed:  # as a worker counts the stages it ends
            observability.metric(
                "StagesFinished",
                1,
                dimensions={"Outcome": "failed"},
                runId=run_id,
                stageId=stage_id,
            )
        totals["skipped"] += len(swept.skipped)
        if swept.requeued or swept.failed:
            logger.info(
                "sweeper acted",
                extra={"runId": str(run_id), "requeued": swept.requeued, "failed": swept.failed},
            )
    try:
        totals["callbacks"] = sum(callbacks.deliver_due(until).values())
    except Exception:
        logger.exception("delivering callbacks failed; going on")
        totals["errors"] += 1
    _measure(totals, oldest)
    return totals


def _put_back_quietly(run_id: uuid.UUID, woken: list[Woken]) -> None:
    try:
        put_back_waiting(run_id, woken)
    except Exception:  # left queued: the next sweeps re-send it, as a lost message
        logger.exception("putting woken stages back failed", extra={"runId": str(run_id)})


def oldest_queued_age() -> float:
    """Seconds the oldest stage that is queued and due has waited (0 when none)."""
    with session_scope() as session:
        age = session.execute(
            text(
                "SELECT EXTRACT(EPOCH FROM now() - min(GREATEST(queued_at, not_before))) "
                "FROM stage_executions WHERE status = 'queued' "
                "AND (not_before IS NULL OR not_before <= now())"
            )
        ).scalar()
    return float(age or 0)


def _oldest_queued_age_or_none() -> float | None:
    try:
        return oldest_queued_age()
    except Exception as exc:
        logger.warning("queue age unavailable", extra={"error": type(exc).__name__})
        return None


def _measure(totals: dict[str, int], oldest: float | None) -> None:
    observability.metric("SweeperRequeues", totals["requeued"] + totals["woken"])
    if oldest is not None:
        observability.metric("OldestQueuedStageAge", oldest, "seconds")


def function_end(context: Any = None) -> float | None:
    """When (time.monotonic()) the function running this sweep is stopped: the Lambda
    `context`'s remaining time if given, else in Lambda FUNCTION_TIMEOUT_SECONDS from now;
    None locally without a context (nothing stops it)."""
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    if remaining is not None:
        return time.monotonic() + float(remaining()) / 1000
    if os.environ.get("AWS_LAMBDA_FUNCTION_NAME"):
        return time.monotonic() + FUNCTION_TIMEOUT_SECONDS
    return None


def sweep(context: Any = None) -> dict[str, int]:
    """The scheduled handler: one sweep locally (the poller calls it every interval); in
    Lambda, a sweep every MAOF_SWEEP_INTERVAL_SECONDS for one schedule period. Every
    round's callbacks end FUNCTION_MARGIN_SECONDS before the function is stopped (the
    Lambda `context` says when), whatever the interval."""
    interval = get_settings().sweep_interval_seconds
    # A round delivers callbacks for at most this long, however slow their receivers (and
    # however many are due): one try's timeout, or the interval if longer.
    for_callbacks = max(interval, callbacks.TIMEOUT_SECONDS)
    started = time.monotonic()
    end = function_end(context)
    # Past it, a callback posted would be killed before its outcome is recorded: posted
    # again after its claim, its attempt never counted.
    callbacks_end = None if end is None else end - FUNCTION_MARGIN_SECONDS
    rounds_until = started  # one round
    if os.environ.get("AWS_LAMBDA_FUNCTION_NAME") and interval < SCHEDULE_PERIOD_SECONDS:
        # Rounds for one schedule period: done before the next scheduled invocation.
        rounds_until = started + SCHEDULE_PERIOD_SECONDS - 15
    totals: dict[str, int] = defaultdict(int)
    while True:
        until = time.monotonic() + for_callbacks
        if callbacks_end is not None:
            until = min(until, callbacks_end)
        for key, value in sweep_once(until).items():
            totals[key] += value
        if time.monotonic() + interval >= rounds_until:
            return dict(totals)
        time.sleep(interval)
