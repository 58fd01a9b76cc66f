"""The workflow-runs API, over HTTP and against the real database: an Idempotency-Key
older than 24 h is forgotten (a new submission, held to the active-run quota, never its
old run or a 409), and listing runs counts the stages of the page's runs only, never
every user's stage rows."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, event, text

from chalicelib import db
from chalicelib.core.api import parse_run_ref
from chalicelib.db import session_scope
from chalicelib.engine import sweeper
from chalicelib.workflows import runs, stats
from tests.conftest import OWNER_DATABASE_URL
from tests.integration.conftest import Api, register_agent, unique_capability
from tests.integration.test_delivery import principal_of
from tests.integration.test_limits import apply, rate_limited, settings_env  # noqa: F401

KEY = {"Idempotency-Key": "k-expires"}


def workflow(capability: str, stages: int = 1) -> dict[str, Any]:
    return {
        "workflow": {
            "name": "runs-api",
            "stages": [
                {"id": f"s{i}", "name": f"S{i}", "agentCapability": capability}
                for i in range(stages)
            ],
        }
    }


def submitted(client: Api, body: dict[str, Any], **headers: str) -> str:
    response = client.post("/workflows/execute", body, headers=headers)
    assert response.status_code == 202, response.text
    return str(response.json()["data"]["workflowRunId"])


def cancel(client: Api, run_id: str) -> None:
    response = client.post(f"/workflows/{run_id}/cancel")
    assert response.status_code == 202, response.text


# ------------------------------------------------------------------ Idempotency-Key expiry


def test_an_expired_key_is_a_new_submission_even_at_the_quota(
    user: Api,
    sent: Any,
    settings_env: dict[str, str],  # noqa: F811
) -> None:
    apply(settings_env, MAOF_MAX_ACTIVE_RUNS="1")
    body = workflow(unique_capability("expires"))
    old = submitted(user, body, **KEY)
    cancel(user, old)
    with db.session_scope() as session:
        session.execute(
            text(
                "UPDATE submission_keys SET created_at = now() - interval '25 hours' "
                "WHERE run_id = :run_id"
            ),
            {"run_id": parse_run_ref(old)},
        )
    filler = submitted(user, workflow(unique_capability("filler")))  # 1 active: the quota
    # The key has expired, so these are new submissions, refused for the quota: not the
    # old (cancelled) run for the same body, nor a 409 for another body.
    other = workflow(unique_capability("other"))
    for again in (body, other):
        error = rate_limited(user.post("/workflows/execute", again, headers=KEY))
        assert "MAOF_MAX_ACTIVE_RUNS" in error["message"]
    # Under the quota the expired key is taken afresh, by any body ...
    cancel(user, filler)
    fresh = submitted(user, other, **KEY)
    assert fresh != old
    # ... and from then on it is a live key: its run (even at the quota), or a 409.
    assert submitted(user, other, **KEY) == fresh
    conflict = user.post("/workflows/execute", body, headers=KEY)
    assert conflict.status_code == 409, conflict.text


# ------------------------------------------------------------------ listing cost


def stage_rows_read(statement: str, params: Any) -> int:
    """The stage_executions rows `statement` reads, by EXPLAIN ANALYZE (rows a scan
    returned and rows its filter dropped, over all its loops)."""
    with db.get_engine().connect() as conn:
        cursor = conn.connection.cursor()
        cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, params)
        plan = cursor.fetchone()[0][0]["Plan"]

    def read(node: dict[str, Any]) -> int:
        here = 0
        if node.get("Relation Name") == "stage_executions":
            per_loop = node["Actual Rows"] + node.get("Rows Removed by Filter", 0)
            here = round(per_loop * node["Actual Loops"])
        return here + sum(read(child) for child in node.get("Plans", []))

    return read(plan)


@contextmanager
def statements_holding(text_in: str) -> Iterator[list[tuple[str, Any]]]:
    """The statements (and their parameters) this thread sends while the block runs that
    hold `text_in`."""
    captured: list[tuple[str, Any]] = []
    caller = threading.get_ident()

    def grab(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if threading.get_ident() == caller and text_in in statement:
            captured.append((statement, params))

    event.listen(db.get_engine(), "before_cursor_execute", grab)
    try:
        yield captured
    finally:
        event.remove(db.get_engine(), "before_cursor_execute", grab)


def test_listing_runs_counts_only_the_stages_of_the_page(user: Api, api: Api, sent: Any) -> None:
    someone = api.as_new_user()
    for _ in range(30):  # 3000 stage rows that are not the caller's
        submitted(someone, workflow(unique_capability("theirs"), stages=100))
    capability = unique_capability("mine")
    oldest, middle, newest = (submitted(user, workflow(capability, n)) for n in (1, 2, 3))
    with db.session_scope() as session:  # the newest run: one stage done, one failed
        for stage_id, status in (("s0", "completed"), ("s1", "failed")):
            session.execute(
                text("UPDATE stage_executions SET status = :s WHERE run_id = :r AND stage_id = :i"),
                {"s": status, "r": parse_run_ref(newest), "i": stage_id},
            )
    cancel(user, oldest)

    # The same answer as ever: newest first, paged, filtered, each run's stage counts.
    first = user.get("/workflows", params={"limit": 2}).json()["data"]
    assert [(r["workflowRunId"], r["progress"]) for r in first["runs"]] == [
        (newest, {"total": 3, "completed": 1, "failed": 1}),
        (middle, {"total": 2, "completed": 0, "failed": 0}),
    ]
    assert first["meta"] == {"total": 3, "page": 1, "limit": 2, "pages": 2}
    second = user.get("/workflows", params={"limit": 2, "page": 2}).json()["data"]
    assert [(r["workflowRunId"], r["progress"]) for r in second["runs"]] == [
        (oldest, {"total": 1, "completed": 0, "failed": 0})
    ]
    cancelled = user.get("/workflows", params={"status": "cancelled"}).json()["data"]
    assert [r["workflowRunId"] for r in cancelled["runs"]] == [oldest]
    assert cancelled["meta"]["total"] == 1

    # What that first page's statement reads: the 5 stage rows of its 2 runs, no others.
    with statements_holding("stage_executions") as captured:
        runs.list_runs(principal_of(user), runs.RunQuery(limit=2))
    assert len(captured) == 1, [statement for statement, _ in captured]
    assert stage_rows_read(*captured[0]) <= 5


def test_the_sweeper_deletes_expired_keys_and_sessions_and_nothing_live(api: Api) -> None:
    """Idempotency-Keys and sign-in sessions were never deleted: both tables grew with
    every keyed submission and every sign-in, for ever."""
    client = api.as_new_user()
    owner = uuid.UUID(str(client.user and client.user["userUuid"]))
    one_stage = workflow(unique_capability("prune"))
    run = client.post("/workflows/execute", one_stage, headers={"Idempotency-Key": "old"})
    assert run.status_code == 202, run.text
    for key in ("young", "fresh"):
        headers = {"Idempotency-Key": key}
        assert client.post("/workflows/execute", one_stage, headers=headers).status_code == 202
    live = api.post(
        "/auth/login",
        {"email": client.user and client.user["email"], "password": "correct-horse-battery"},
    )
    assert live.status_code == 200
    with session_scope() as session:
        session.execute(
            text(
                "UPDATE submission_keys SET created_at = CASE key "
                "WHEN 'old' THEN now() - interval '25 hours' "
                "WHEN 'young' THEN now() - interval '23 hours' ELSE created_at END "
                "WHERE user_id = :owner"
            ),
            {"owner": owner},
        )
        sessions = (
            session.execute(
                text("SELECT id FROM auth_sessions WHERE user_id = :owner ORDER BY created_at"),
                {"owner": owner},
            )
            .scalars()
            .all()
        )
        assert len(sessions) == 2
        session.execute(  # the first sign-in's, expired two days ago
            text("UPDATE auth_sessions SET expires_at = now() - interval '2 days' WHERE id = :id"),
            {"id": sessions[0]},
        )
    assert sweeper.prune_expired() >= 2
    with session_scope() as session:
        keys = (
            session.execute(
                text("SELECT key FROM submission_keys WHERE user_id = :owner ORDER BY key"),
                {"owner": owner},
            )
            .scalars()
            .all()
        )
        left = (
            session.execute(
                text("SELECT id FROM auth_sessions WHERE user_id = :owner"), {"owner": owner}
            )
            .scalars()
            .all()
        )
    assert keys == ["fresh", "young"]
    assert left == [sessions[1]]
    me = api.get(
        "/auth/me", headers={"Authorization": f"Bearer {live.json()['data']['accessToken']}"}
    )
    assert me.status_code == 200, "the live session is untouched"


def test_every_view_names_a_run_by_its_one_id(user: Api, sent: Any) -> None:
    """A run id is read however uuid.UUID reads it (upper case, no hyphens, urn:uuid:), but
    cancel, retry, result and the audit trail answered with the spelling they were sent:
    one run had several workflowRunIds, and its audit trail's differed from its entries'."""
    run_id = submitted(user, workflow(unique_capability("ids")))
    raw = run_id.removeprefix("wfr-")
    for spelling in ["wfr-" + raw.upper(), "wfr-" + raw.replace("-", ""), "wfr-urn:uuid:" + raw]:
        assert user.get(f"/workflows/{spelling}").json()["data"]["workflowRunId"] == run_id
        trail = user.get(f"/workflows/{spelling}/audit").json()["data"]
        assert trail["workflowRunId"] == run_id
    cancelled = user.post(f"/workflows/wfr-{raw.upper()}/cancel").json()["data"]
    assert cancelled["workflowRunId"] == run_id
    retried = user.post(f"/workflows/wfr-{raw.replace('-', '')}/retry").json()["data"]
    assert retried["workflowRunId"] == run_id


def test_stats_read_only_the_stages_of_the_callers_recent_runs(
    user: Api, api: Api, sent: Any
) -> None:
    """GET /stats found the stages that ended in its hour by filtering every user's stage
    rows (no index on their end): each call's cost grew with the whole service's history.
    It now starts from the caller's runs that may hold such stages."""
    someone = api.as_new_user()
    theirs = [
        submitted(someone, workflow(unique_capability("busy"), stages=100)) for _ in range(20)
    ]
    mine = submitted(user, workflow(unique_capability("mine"), stages=2))
    agent = register_agent(user, unique_capability("stats"))
    with db.session_scope() as session:
        session.execute(
            text(
                "UPDATE stage_executions SET status = 'completed', agent_id = 'agent-x', "
                "agent_uuid = :agent, started_at = now() - interval '1 second', "
                "completed_at = now() WHERE run_id = ANY(:runs)"
            ),
            {"runs": [parse_run_ref(r) for r in [*theirs, mine]], "agent": agent["agentUuid"]},
        )
    # The caller's own history: 2,000 runs of a month ago, 30 stages each.
    with db.session_scope() as session:
        session.execute(
            text(
                "WITH old AS (INSERT INTO workflow_runs (id, user_id, workflow_name, definition, "
                "status, created_at, completed_at) SELECT gen_random_uuid(), :owner, 'old', "
                "'{}', 'completed', now() - interval '30 days', now() - interval '30 days' "
                "FROM generate_series(1, 2000) RETURNING id) "
                "INSERT INTO stage_executions (run_id, stage_id, stage_name, position, "
                "capability, dependencies, status, agent_uuid, agent_id, started_at, "
                "completed_at) SELECT old.id, 's' || i, 'S', i, 'old', '{}', 'completed', "
                ":agent, 'agent-x', now() - interval '30 days', now() - interval '30 days' "
                "FROM old, generate_series(1, 30) AS i"
            ),
            {"owner": principal_of(user).user_uuid, "agent": agent["agentUuid"]},
        )
    with create_engine(OWNER_DATABASE_URL).connect() as owner:  # as autovacuum would
        owner.execute(text("ANALYZE workflow_runs"))
        owner.execute(text("ANALYZE stage_executions"))
        owner.commit()
    with statements_holding("percentile_cont") as captured:
        answer = stats.stats(principal_of(user))
    assert [(a.agent_id, a.completed) for a in answer.agents] == [("agent-x", 2)]
    assert stage_rows_read(*captured[0]) <= 10
