"""Completion callbacks: when a run with a `callback` ends, MAOF POSTs its outcome to the
callback URL, signed, at least once.

The body: `{workflowRunId, status, workflowName, completedAt, output | errorMessage,
chain: {head}, timestamp, deliveryId}`. The headers: `X-Maof-Signature: sha256=<hex
HMAC-SHA256 of the raw body, keyed with the callback's secret>`, `X-Maof-Timestamp` (Unix
seconds, also in the body, so a receiver can refuse old replays) and `X-Maof-Delivery`
(one id per run end, the same on every try of it, so a receiver can drop a repeat; also in
the body, so signed: a replay under another id fails the check). Any 2xx answer within
TIMEOUT_SECONDS, connect to last byte, is a delivery; anything else is tried again after a backoff (10 s, 20 s, 40 s … up to 5
minutes; MAX_ATTEMPTS tries, about 20 minutes); the run's detail shows how it went
(`callback: {url, state, attempts, lastError}`). Deliveries are not audit entries: a
run's chain ends with the run. The request goes through the SSRF guard
and never follows a redirect.

The sweeper delivers what is due (its every round: within seconds of the run's end),
batch after batch while its round has time. It first takes the due callbacks (FOR UPDATE SKIP LOCKED, moving their next try a minute on,
so two sweepers never post one at once and a sweeper that dies mid-delivery only delays
it), then posts them outside any transaction, a few at a time, and records each outcome.
Users take turns (every user's oldest due, then every user's second, ...), so one user's
receivers that never answer cannot hold back another user's callback past the next
round. One whose turn comes too late in the round to be tried (the receivers before it
were slow) goes back as it was, due in its place, no attempt used.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import urllib3
from sqlalchemy import text

from chalicelib.agents.network import EndpointNotAllowed, pinned_request, read_by, time_left
from chalicelib.agents.secrets import decrypt_token
from chalicelib.core.api import run_ref
from chalicelib.core.encoding import dumps
from chalicelib.db import session_scope
from chalicelib.logs import logger

MAX_ATTEMPTS = 8
FIRST_BACKOFF_SECONDS = 10
MAX_BACKOFF_SECONDS = 300
TIMEOUT_SECONDS = 10.0
BATCH = 20


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def backoff_seconds(attempts: int) -> int:
    """Seconds before the next try after `attempts` failed ones."""
    return int(min(MAX_BACKOFF_SECONDS, FIRST_BACKOFF_SECONDS * 2 ** (attempts - 1)))


def payload(run: Any, head: str | None, timestamp: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "workflowRunId": run_ref(run.id),
        "status": run.status,
        "workflowName": run.workflow_name,
        "completedAt": run.completed_at,
        "chain": {"head": head},
        "timestamp": timestamp,
        # What receivers drop repeats by: signed, as the header alone is not.
        "deliveryId": str(run.callback_delivery),
    }
    if run.status == "completed":
        body["output"] = run.output
    else:
        body["errorMessage"] = run.error_message
    return body


CLAIM_SECONDS = 60  # a taken callback is tried again this long after, if its taker died
CONCURRENT_POSTS = 8


def deliver_due(until: float | None = None) -> dict[str, int]:
    """Try the callbacks that are due, a batch at a time, until none is (or `until`, a
    time.monotonic() value, is near: every try ends by it); how many were delivered, are
    to be retried, and were given up. Without `until`, one batch, each try ending within
    TIMEOUT_SECONDS. A callback whose turn comes too near `until` to start is handed back
    untried (counted in none of them): still due, in its place, with no attempt used."""
    counts = {"delivered": 0, "retrying": 0, "abandoned": 0}
    while until is None or until - time.monotonic() >= MIN_TRY_SECONDS:
        due = _take_due()
        if due:
            with ThreadPoolExecutor(max_workers=min(CONCURRENT_POSTS, len(due))) as pool:
                for outcome in pool.map(lambda run: _deliver(run, until), due):
                    if outcome in counts:
                        counts[outcome] += 1
        if until is None or len(due) < BATCH:
            break
    return counts


# A try is not started with less time than this left before the caller's `until`.
MIN_TRY_SECONDS = 2.0


# Users take turns: every user's oldest due callback, then every user's second, and so
# on (each turn oldest due first). Taken oldest first whoever's, one user's receivers that
# never answer, due ahead, held every post of a round, round after round, and any other
# user's callback waited behind all of them. In the order the pool starts them (an
# UPDATE's RETURNING follows no ORDER BY): a batch's last callbacks are those that may not
# start before `until`. Each comes with when it was due, to go back in its place if it is
# not tried. (A window function cannot share a SELECT with FOR UPDATE: ranked first.)
_TAKE_DUE = text(
    """
    WITH ranked AS (
        SELECT id, row_number() OVER (
                   PARTITION BY user_id ORDER BY callback_next_at, id) AS turn
          FROM workflow_runs
         WHERE callback_state = 'pending' AND callback_next_at <= now()
           AND status IN ('completed', 'failed', 'cancelled')
    ), due AS (
        SELECT r.id, r.callback_next_at, ranked.turn
          FROM workflow_runs AS r JOIN ranked ON ranked.id = r.id
         WHERE r.callback_state = 'pending' AND r.callback_next_at <= now()  -- as locked
         ORDER BY ranked.turn, r.callback_next_at, r.id LIMIT :batch
           FOR UPDATE OF r SKIP LOCKED
    ), taken AS (
        UPDATE workflow_runs AS r
           SET callback_next_at = now() + make_interval(secs => :claim)
          FROM due WHERE r.id = due.id
     RETURNING r.id, r.status, r.workflow_name, r.completed_at, r.output, r.error_message,
               r.callback_url, r.callback_secret_encrypted, r.callback_attempts,
               r.callback_delivery, due.callback_next_at AS due_at, due.turn
    )
    SELECT * FROM taken ORDER BY turn, due_at, id
    """
)


def _take_due() -> list[Any]:
    with session_scope() as session:
        return list(session.execute(_TAKE_DUE, {"batch": BATCH, "claim": CLAIM_SECONDS}).all())


def _hand_back(run: Any) -> None:
    """A taken callback that was not tried: due again when it was, its attempts as they
    were (unless the run was retried meanwhile: its delivery is then over)."""
    with session_scope() as session:
        session.execute(
            text(
                "UPDATE workflow_runs SET callback_next_at = :due_at "
                "WHERE id = :id AND callback_delivery = :delivery AND callback_state = 'pending'"
            ),
            {"id": run.id, "due_at": run.due_at, "delivery": run.callback_delivery},
        )


def _deliver(run: Any, until: float | None = None) -> str:
    if until is not None and until - time.monotonic() < MIN_TRY_SECONDS:
        # Its turn came too late in the round (receivers before it were slow): no request
        # was made, so no attempt is used up; the next round tries it.
        _hand_back(run)
        return "untried"
    with session_scope() as session:
        head = session.execute(
            text(
                "SELECT entry_hash FROM execution_logs WHERE run_id = :id ORDER BY seq DESC LIMIT 1"
            ),
            {"id": run.id},
        ).scalar()
    timestamp = int(time.time())
    body = dumps(payload(run, head, timestamp)).encode("utf-8")
    error = _post(run, body, timestamp, until)
    attempts = run.callback_attempts + 1
    if error is None:
        state, next_at = "delivered", None
    elif attempts >= MAX_ATTEMPTS:
        state, next_at = "failed", None
    else:
        state, next_at = "pending", backoff_seconds(attempts)
    with session_scope() as session:
        session.execute(
            text(
                "UPDATE workflow_runs SET callback_state = :state, "
                "callback_attempts = :attempts, callback_error = :error, "
                "callback_next_at = CASE WHEN CAST(:next AS int) IS NULL THEN NULL "
                "ELSE now() + make_interval(secs => CAST(:next AS int)) END, "
                # Delivered or given up, a completed run's secret is never used again (it
                # is not retried); a failed or cancelled run's signs a retry's callback.
                "callback_secret_encrypted = CASE WHEN CAST(:over AS boolean) "
                "AND status = 'completed' THEN NULL ELSE callback_secret_encrypted END "
                "WHERE id = :id AND callback_delivery = :delivery"
            ),
            {
                "id": run.id,
                "state": state,
                "over": state != "pending",
                "attempts": attempts,
                "error": error,
                "next": next_at,
                "delivery": run.callback_delivery,
            },
        )
    if state != "pending":
        logger.info(
            "callback delivered" if state == "delivered" else "callback given up",
            extra={"runId": str(run.id), "attempts": attempts, "error": error},
        )
    return {"delivered": "delivered", "failed": "abandoned"}.get(state, "retrying")


def _post(run: Any, body: bytes, timestamp: int, until: float | None = None) -> str | None:
    """None once delivered; else what went wrong (stored, shown in the run's detail)."""
    try:
        secret = decrypt_token(run.callback_secret_encrypted)
        deadline = time.monotonic() + TIMEOUT_SECONDS
        deadline = deadline if until is None else min(deadline, until)
        response = pinned_request(
            "POST",
            run.callback_url,
            body=body,
            headers={
                "Content-Type": "application/json",
                "User-Agent": "maof-callbacks/1",
                "X-Maof-Signature": signature(secret, body),
                "X-Maof-Timestamp": str(timestamp),
                "X-Maof-Delivery": str(run.callback_delivery),
            },
            timeout=urllib3.Timeout(connect=min(5.0, time_left(deadline)), read=TIMEOUT_SECONDS),
            deadline=deadline,
        )
        try:
            read_by(response, deadline, 4096)  # a receiver trickling it holds no sweeper
        finally:
            response.release_conn()
    except EndpointNotAllowed as exc:
        return f"the callback URL is not allowed: {exc}"
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        return f"could not reach the callback URL ({type(exc).__name__})"
    except Exception as exc:
        logger.exception("callback delivery failed", extra={"runId": str(run.id)})
        return f"delivery failed ({type(exc).__name__})"
    if 200 <= response.status < 300:
        return None
    return f"the callback URL answered HTTP {response.status}"


def verify(secret: str, body: bytes, header: str) -> bool:
    """What a receiver does (docs/api.md): compare in constant time."""
    return hmac.compare_digest(signature(secret, body), header)
