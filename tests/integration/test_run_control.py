"""Run control over HTTP, LocalStack SQS and the poller, with real HTTP agents that record
their calls: cancel, retry from the failed stage, idempotent submission, run deadlines,
and signed completion callbacks (retried until delivered)."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from typing import Any

import pytest
from sqlalchemy import text

from chalicelib.agents.secrets import reencrypt_all
from chalicelib.config import get_settings, reset_settings
from chalicelib.core.api import parse_run_ref
from chalicelib.db import session_scope
from chalicelib.engine import callbacks, handlers, leases, stages
from chalicelib.workflows import control
from tests.integration.conftest import (
    Api,
    register_agent,
    restore_secret_key,
    unique_capability,
    wait_for_run,
    wait_until,
)
from tests.integration.test_delivery import audit_actions, stage_row
from tests.support.agents import ScriptedAgent, error, ok, sleep, trickle
from tests.support.agents import start_agent as start
from tests.support.callbacks import CallbackReceiver, Tarpit, TricklingServer


def pipeline(first: str, second: str, **workflow: Any) -> dict[str, Any]:
    return {
        "workflow": {
            "name": "control",
            "stages": [
                {"id": "a", "name": "A", "agentCapability": first},
                {"id": "b", "name": "B", "agentCapability": second, "dependencies": ["a"]},
            ],
            **workflow,
        },
        "input": {"text": "hi"},
    }


def submitted(client: Api, body: dict[str, Any], **headers: str) -> str:
    response = client.post("/workflows/execute", body, headers=headers)
    assert response.status_code == 202, response.text
    return str(response.json()["data"]["workflowRunId"])


def ended(client: Api, run_id: str, timeout: float = 30) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        data = client.get(f"/workflows/{run_id}").json()["data"]
        return data if data["status"] in ("completed", "failed", "cancelled") else None

    return dict(wait_until(done, timeout=timeout, interval=0.1))


def audit(client: Api, run_id: str) -> dict[str, Any]:
    return dict(client.get(f"/workflows/{run_id}/audit").json()["data"])


# ------------------------------------------------------------------ cancel


def test_cancel_during_a_slow_stage_ends_the_run_and_calls_no_further_agent(
    user: Api, poller: Any, agents: list[ScriptedAgent]
) -> None:
    slow, nxt = start(agents, default=sleep(3.0, {"late": True})), start(agents)
    first, second = unique_capability("slow"), unique_capability("next")
    register_agent(user, first, endpoint=slow.url)
    register_agent(user, second, endpoint=nxt.url)
    run_id = submitted(user, pipeline(first, second))
    wait_until(lambda: len(slow.calls) == 1, timeout=10)
    started = time.monotonic()
    response = user.post(f"/workflows/{run_id}/cancel")
    assert response.status_code == 202, response.text
    assert response.json()["data"]["status"] == "cancelled"
    run = ended(user, run_id, timeout=5)
    assert time.monotonic() - started < 5
    assert run["status"] == "cancelled"
    assert user.user is not None and user.user["email"] in run["errorMessage"]
    assert [s["status"] for s in run["stages"]] == ["in_progress", "cancelled"]
    # The slow agent answers after the cancel: its output is discarded.
    wait_until(
        lambda: (
            user.get(f"/workflows/{run_id}").json()["data"]["stages"][0]["status"] == "cancelled"
        ),
        timeout=10,
    )
    stage = user.get(f"/workflows/{run_id}").json()["data"]["stages"][0]
    assert stage["output"] is None
    trail = audit(user, run_id)
    assert trail["chain"]["valid"] is True
    actions = [e["action"] for e in trail["logs"]]
    assert actions == ["submit", "cancel", "discard"]
    cancel_entry = trail["logs"][1]
    assert cancel_entry["details"]["by"] == user.user["email"]
    assert nxt.calls == [], "no agent is called after the cancel"
    assert user.get(f"/workflows/{run_id}/result").status_code == 404


@pytest.mark.parametrize("retryable", [False, True])
def test_an_error_answered_after_a_cancel_is_discarded_and_fails_nothing(
    user: Api, poller: Any, agents: list[ScriptedAgent], retryable: bool
) -> None:
    """An agent that answers an error after the cancel, final or one it would be retried
    for: the stage becomes `cancelled` and a `discard` entry records the error, as for a
    success answer. A final error used to be marked `failed`, with a `fail` entry, in a run
    that was cancelled; a retryable one got a `skip` entry, as if nothing had come back."""
    body = json.dumps(
        {"status": "error", "code": "BROKEN", "message": "scripted", "retryable": retryable}
    ).encode()
    slow = start(agents, default=trickle(body, interval=0.02))  # the error, in about 2 s
    first, second = unique_capability("late-error"), unique_capability("next")
    register_agent(user, first, endpoint=slow.url)
    register_agent(user, second)
    definition = pipeline(first, second)
    definition["workflow"]["stages"][0]["config"] = {"retries": 2, "backoffMs": 0}
    run_id = submitted(user, definition)
    wait_until(lambda: len(slow.calls) == 1, timeout=10)
    assert user.post(f"/workflows/{run_id}/cancel").status_code == 202
    wait_until(
        lambda: (
            user.get(f"/workflows/{run_id}").json()["data"]["stages"][0]["status"] == "cancelled"
        ),
        timeout=15,
    )
    run = user.get(f"/workflows/{run_id}").json()["data"]
    assert run["status"] == "cancelled"
    assert [s["status"] for s in run["stages"]] == ["cancelled", "cancelled"]
    assert run["stages"][0]["errorMessage"] is None
    trail = audit(user, run_id)
    assert trail["chain"]["valid"] is True
    assert [e["action"] for e in trail["logs"]] == ["submit", "cancel", "discard"]
    discard = trail["logs"][2]
    assert (discard["stageId"], discard["outputHash"]) == ("a", None)
    assert "BROKEN" in discard["details"]["error"], discard


def test_cancelling_an_ended_run_is_409_and_another_users_run_404(
    user: Api, api: Api, poller: Any
) -> None:
    capability = unique_capability("done")
    register_agent(user, capability)
    run_id = submitted(user, pipeline(capability, capability))
    assert wait_for_run(user, run_id)["status"] == "completed"
    conflict = user.post(f"/workflows/{run_id}/cancel")
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "CONFLICT"
    assert api.as_new_user().post(f"/workflows/{run_id}/cancel").status_code == 404
    assert api.as_new_user().post(f"/workflows/{run_id}/retry").status_code == 404


# ------------------------------------------------------------------ retry


def test_retry_after_a_failure_runs_only_what_did_not_complete(
    user: Api, poller: Any, agents: list[ScriptedAgent]
) -> None:
    good = start(agents, default=ok({"step": "a"}))
    flaky = start(agents)
    flaky.script.append(error("BROKEN", retryable=False))  # fails once, then answers
    first, second = unique_capability("good"), unique_capability("flaky")
    register_agent(user, first, endpoint=good.url)
    register_agent(user, second, endpoint=flaky.url)
    run_id = submitted(user, pipeline(first, second))
    failed = wait_for_run(user, run_id)
    assert failed["status"] == "failed", failed
    assert user.post(f"/workflows/{run_id}/retry").status_code == 202
    run = wait_for_run(user, run_id)
    assert run["status"] == "completed", run
    assert len(good.calls) == 1, "the completed stage was not called again"
    assert len(flaky.calls) == 2
    assert flaky.keys() == [f"{run_id}:b:1", f"{run_id}:b:2"], "a new attempt, a new key"
    trail = audit(user, run_id)
    assert trail["chain"]["valid"] is True
    actions = [e["action"] for e in trail["logs"]]
    assert actions.index("retry-run") > actions.index("fail")
    assert actions[-2:] == ["execute", "complete"]
    assert user.get(f"/workflows/{run_id}/result").json()["data"]["output"] == {
        "echo": {"a": {"step": "a"}}
    }


def test_a_run_is_retried_at_most_max_retries_times(
    user: Api, poller: Any, agents: list[ScriptedAgent], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each retry continues the run's one audit chain (a cancel and retry of a wide run
    adds a discard entry a stage in flight): unbounded, the trail and its export outgrew
    what the API can answer. Past MAOF_RUN_MAX_RETRIES, the workflow is submitted anew."""
    broken = start(agents, default=error("BROKEN", retryable=False))
    capability = unique_capability("retried")
    register_agent(user, capability, endpoint=broken.url)
    run_id = submitted(user, pipeline(capability, capability))
    monkeypatch.setenv("MAOF_RUN_MAX_RETRIES", "1")
    reset_settings()
    try:
        assert wait_for_run(user, run_id)["status"] == "failed"
        assert user.post(f"/workflows/{run_id}/retry").status_code == 202
        assert wait_for_run(user, run_id)["status"] == "failed"
        refused = user.post(f"/workflows/{run_id}/retry")
        assert refused.status_code == 409, refused.text
        assert "MAOF_RUN_MAX_RETRIES" in refused.json()["error"]["message"]
        assert user.get(f"/workflows/{run_id}").json()["data"]["status"] == "failed"
        actions = [action for action, _ in audit_actions(parse_run_ref(run_id))]
        assert actions.count("retry-run") == 1
    finally:
        monkeypatch.undo()
        reset_settings()


def test_retry_of_a_cancelled_run_and_409_for_runs_that_did_not_stop(
    user: Api, poller: Any, agents: list[ScriptedAgent]
) -> None:
    slow = start(agents, default=sleep(1.0, {"x": 1}))
    capability = unique_capability("again")
    register_agent(user, capability, endpoint=slow.url)
    run_id = submitted(user, pipeline(capability, capability))
    wait_until(lambda: len(slow.calls) == 1, timeout=10)
    assert user.post(f"/workflows/{run_id}/retry").status_code == 409  # still running
    assert user.post(f"/workflows/{run_id}/cancel").status_code == 202
    wait_until(
        lambda: all(
            s["status"] == "cancelled"
            for s in user.get(f"/workflows/{run_id}").json()["data"]["stages"]
        ),
        timeout=10,
    )
    assert user.post(f"/workflows/{run_id}/retry").status_code == 202
    assert wait_for_run(user, run_id)["status"] == "completed"
    assert user.post(f"/workflows/{run_id}/retry").status_code == 409  # completed


def test_a_retry_right_after_a_cancel_runs_the_stage_in_progress_afresh(
    user: Api, poller: Any, agents: list[ScriptedAgent]
) -> None:
    """Cancel while A's agent works, replace that agent, retry at once: A runs afresh, on
    the new agent under a new attempt, and what the old agent answers later is not kept.
    The retry used to leave the stage in progress alone, and the cancelled call's answer
    became A's output in the live run."""
    old = start(agents, default=sleep(2.0, {"from": "the cancelled call"}))
    new = start(agents, default=ok({"from": "the new agent"}))
    first, second = unique_capability("replaced"), unique_capability("next")
    old_agent = register_agent(user, first, endpoint=old.url)
    register_agent(user, second)
    run_id = submitted(user, pipeline(first, second))
    wait_until(lambda: len(old.calls) == 1, timeout=10)
    with session_scope() as session:
        old_claim = session.execute(
            text("SELECT claim_token FROM stage_executions WHERE run_id = :r AND stage_id = 'a'"),
            {"r": parse_run_ref(run_id)},
        ).scalar_one()
    assert user.post(f"/workflows/{run_id}/cancel").status_code == 202
    assert user.delete(f"/agents/{old_agent['agentUuid']}").status_code in (200, 204)
    register_agent(user, first, endpoint=new.url)
    retried = user.post(f"/workflows/{run_id}/retry")
    assert retried.status_code == 202, retried.text
    assert retried.json()["data"]["stagesRequeued"] == ["a"]
    assert wait_for_run(user, run_id)["status"] == "completed"
    # The old worker is done with its stage (the answer came back, and was handled).
    wait_until(lambda: old_claim not in leases._held, timeout=10)
    assert old.calls[0].outcome == "answered"
    run = user.get(f"/workflows/{run_id}").json()["data"]
    assert run["status"] == "completed"
    assert run["stages"][0]["output"] == {"from": "the new agent"}
    assert (old.keys(), new.keys()) == ([f"{run_id}:a:1"], [f"{run_id}:a:2"])
    trail = audit(user, run_id)
    assert trail["chain"]["valid"] is True
    actions = [e["action"] for e in trail["logs"]]
    assert actions == ["submit", "cancel", "discard", "retry-run", "execute", "execute", "complete"]
    discard = trail["logs"][2]
    assert (discard["stageId"], discard["status"]) == ("a", "cancelled")
    assert discard["agentId"] == old_agent["agentId"]
    assert discard["details"]["attempt"] == 1


# ------------------------------------------------------------------ idempotent submission


def test_concurrent_submissions_with_one_key_make_one_run(user: Api, poller: Any) -> None:
    capability = unique_capability("idem")
    register_agent(user, capability)
    body = pipeline(capability, capability)
    barrier = threading.Barrier(8)
    answers: list[Any] = []

    def submit_once() -> None:
        barrier.wait()
        answers.append(user.post("/workflows/execute", body, headers={"Idempotency-Key": "k-1"}))

    threads = [threading.Thread(target=submit_once) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert {a.status_code for a in answers} == {202}
    ids = {a.json()["data"]["workflowRunId"] for a in answers}
    assert len(ids) == 1
    listed = user.get("/workflows", params={"limit": 100}).json()["data"]["runs"]
    assert sum(r["workflowName"] == "control" for r in listed) == 1
    again = user.post("/workflows/execute", body, headers={"Idempotency-Key": "k-1"})
    assert again.json()["data"]["workflowRunId"] in ids
    other = dict(body, input={"text": "something else"})
    conflict = user.post("/workflows/execute", other, headers={"Idempotency-Key": "k-1"})
    assert conflict.status_code == 409
    assert "different request body" in conflict.json()["error"]["message"]


def test_a_key_is_per_user_and_expires_after_a_day(user: Api, api: Api, poller: Any) -> None:
    capability = unique_capability("scope")
    register_agent(user, capability)
    body = pipeline(capability, capability)
    mine = submitted(user, body, **{"Idempotency-Key": "shared-key"})
    someone = api.as_new_user()
    register_agent(someone, capability)
    theirs = submitted(someone, body, **{"Idempotency-Key": "shared-key"})
    assert mine != theirs
    with session_scope() as session:
        session.execute(text("UPDATE submission_keys SET created_at = now() - interval '25 hours'"))
    assert submitted(user, body, **{"Idempotency-Key": "shared-key"}) != mine


def test_a_malformed_idempotency_key_is_400(user: Api) -> None:
    body = pipeline(unique_capability(), unique_capability())
    response = user.post("/workflows/execute", body, headers={"Idempotency-Key": "x" * 256})
    assert response.status_code == 400
    assert response.json()["error"]["details"][0]["field"] == "Idempotency-Key"


# ------------------------------------------------------------------ deadlines


def test_a_run_past_its_deadline_fails_naming_it(
    user: Api, poller: Any, agents: list[ScriptedAgent]
) -> None:
    slow = start(agents, default=sleep(10.0))
    capability = unique_capability("deadline")
    register_agent(user, capability, endpoint=slow.url)
    body = pipeline(capability, capability, timeoutMs=1500)
    body["workflow"]["stages"][0]["config"] = {"timeoutMs": 60_000}  # the deadline wins
    run_id = submitted(user, body)
    started = time.monotonic()
    run = ended(user, run_id, timeout=15)
    assert run["status"] == "failed"
    assert run["errorMessage"] == "deadline of 1500 ms exceeded"
    assert time.monotonic() - started < 8
    assert [s["status"] for s in run["stages"]][1] == "skipped"
    assert audit(user, run_id)["chain"]["valid"] is True
    # The agent was told the time it had: the run's, not the stage's 60 s.
    [call] = slow.calls
    assert 0 < call.body["context"]["deadlineMs"] <= 1500


def test_the_sweeper_fails_a_run_that_waits_past_its_deadline(user: Api, sent: Any) -> None:
    capability = unique_capability("queued-deadline")
    register_agent(user, capability)
    run_id = submitted(user, pipeline(capability, capability, timeoutMs=100))
    time.sleep(0.2)  # the deadline passes while its first stage sits in the queue
    assert handlers.sweep_stalled_stages()["expired"] >= 1
    run = user.get(f"/workflows/{run_id}").json()["data"]
    assert run["status"] == "failed"
    assert "deadline of 100 ms" in run["errorMessage"]


@pytest.mark.parametrize("answer", ["output", "error"])
def test_an_answer_after_the_deadline_fails_the_run_as_the_deadline_would(
    user: Api, sent: Any, answer: str
) -> None:
    """Past its deadline before the sweeper noticed, a run was completed (or failed by the
    stage's error) by its stage's answer; docs/api.md: a run not ended timeoutMs after
    submission fails. Now the answer ends it as the deadline does and is discarded."""
    capability = unique_capability("late-answer")
    agent = register_agent(user, capability)
    receiver = CallbackReceiver([])
    try:
        body = dict(
            pipeline(capability, capability, timeoutMs=60_000),
            callback={"url": receiver.url, "secret": SECRET},
        )
        run_id = submitted(user, body)
        run_uuid = parse_run_ref(run_id)
        claimed = stages.claim_stage(run_uuid, "a")
        assert claimed is not None
        with session_scope() as session:
            session.execute(
                text(
                    "UPDATE workflow_runs SET deadline_at = now() - interval '1 second' WHERE id = :r"
                ),
                {"r": run_uuid},
            )
        if answer == "output":
            outcome = stages.complete_stage(claimed, agent["agentUuid"], "x", {}, {"v": 1}).outcome
        else:
            outcome = stages.fail_stage(claimed, "boom", agent_id="x")
        assert outcome == "discarded"
        run = user.get(f"/workflows/{run_id}").json()["data"]
        assert (run["status"], run["errorMessage"]) == ("failed", "deadline of 60000 ms exceeded")
        assert run["callback"]["state"] == "pending"
        assert [stage_row(run_uuid, s).status for s in ("a", "b")] == ["skipped", "skipped"]
        actions = audit_actions(run_uuid)
        assert [a for a, _ in actions].count("deadline") == 1
        assert ("discard", "a") in actions
        assert not {"execute", "fail", "complete"} & {a for a, _ in actions}
        assert audit(user, run_id)["chain"]["valid"] is True
    finally:
        receiver.stop()


# ------------------------------------------------------------------ callbacks


SECRET = "a-callback-secret-0123456789"


def test_a_callback_is_delivered_once_signed_and_retried_after_a_500(
    user: Api, poller: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(callbacks, "FIRST_BACKOFF_SECONDS", 0)
    receiver = CallbackReceiver([500])
    try:
        capability = unique_capability("hook")
        register_agent(user, capability)
        body = dict(
            pipeline(capability, capability), callback={"url": receiver.url, "secret": SECRET}
        )
        run_id = submitted(user, body)
        assert wait_for_run(user, run_id)["status"] == "completed"
        detail = user.get(f"/workflows/{run_id}").json()["data"]
        assert detail["callback"]["url"] == receiver.url
        assert "secret" not in json.dumps(detail)

        def delivered() -> bool:
            handlers.sweep_stalled_stages()
            return len(receiver.received) >= 2

        wait_until(delivered, timeout=20, interval=0.2)
        handlers.sweep_stalled_stages()
        assert len(receiver.received) == 2, "delivered once after one failure, not again"
        first, second = receiver.received
        assert first[0]["X-Maof-Delivery"] == second[0]["X-Maof-Delivery"]
        # The id receivers drop repeats by is signed: in the body, the same on every try.
        for _, raw in receiver.received:
            assert json.loads(raw)["deliveryId"] == first[0]["X-Maof-Delivery"]
        headers, raw = second
        expected = "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["X-Maof-Signature"], expected)
        payload = json.loads(raw)
        assert payload["workflowRunId"] == run_id
        assert payload["status"] == "completed"
        assert payload["timestamp"] == int(headers["X-Maof-Timestamp"])
        assert payload["chain"]["head"] == audit(user, run_id)["chain"]["head"]
        assert "output" in payload and "errorMessage" not in payload
        state = user.get(f"/workflows/{run_id}").json()["data"]["callback"]
        assert (state["state"], state["attempts"]) == ("delivered", 2)
    finally:
        receiver.stop()


def test_a_delivery_in_flight_when_the_run_is_retried_arms_no_callback_for_the_live_run(
    user: Api, sent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweeper POSTs a cancelled run's callback; the user retries the run meanwhile;
    the POST fails. Its outcome used to be recorded against the retried run (same delivery
    id), pending again, and the next round POSTed a "completion" for a run in progress."""
    monkeypatch.setattr(callbacks, "FIRST_BACKOFF_SECONDS", 0)
    receiver = CallbackReceiver([500])
    try:
        (ref,) = _due_callbacks(user, [receiver.url])
        (in_flight,) = [r for r in callbacks._take_due() if r.id == parse_run_ref(ref)]
        retried = user.post(f"/workflows/{ref}/retry")
        assert retried.status_code == 202, retried.text
        assert callbacks._deliver(in_flight) == "retrying"  # answered 500
        with session_scope() as session:  # were anything pending, it would be due now
            session.execute(
                text("UPDATE workflow_runs SET callback_next_at = now() WHERE id = :id"),
                {"id": parse_run_ref(ref)},
            )
        callbacks.deliver_due()
        detail = user.get(f"/workflows/{ref}").json()["data"]
        assert detail["status"] == "in_progress"
        assert [json.loads(raw)["status"] for _, raw in receiver.received] == ["cancelled"]
        assert detail["callback"].get("state") is None, detail["callback"]
    finally:
        receiver.stop()


@pytest.mark.parametrize("head", [True, False], ids=["headers trickled", "body trickled"])
def test_a_callback_receiver_trickling_its_answer_is_cut_off_at_the_timeout(
    monkeypatch: pytest.MonkeyPatch, head: bool
) -> None:
    """A hostile receiver must not hold the sweeper (which delivers callbacks in its
    round) past a delivery's timeout, however it paces its bytes."""
    from types import SimpleNamespace

    from chalicelib.agents.secrets import encrypt_token

    monkeypatch.setattr(callbacks, "TIMEOUT_SECONDS", 1.0)
    receiver = TricklingServer("head" if head else "body")
    run = SimpleNamespace(
        id="run",
        callback_url=receiver.url,
        callback_secret_encrypted=encrypt_token(SECRET),
        callback_delivery="delivery",
    )
    started = time.monotonic()
    try:
        error = callbacks._post(run, b"{}", int(time.time()))
    finally:
        receiver.stop.set()
    assert time.monotonic() - started < 2.5
    assert error is not None and "could not reach the callback URL" in error, error


def _due_callbacks(user: Api, urls: list[str], status: str = "cancelled") -> list[str]:
    """Runs (ended, as `status`, before anything ran them) whose callbacks are due now, one
    per URL."""
    capability = unique_capability("due")
    register_agent(user, capability)
    refs = [
        submitted(
            user, dict(pipeline(capability, capability), callback={"url": u, "secret": SECRET})
        )
        for u in urls
    ]
    with session_scope() as session:
        session.execute(
            text(
                "UPDATE workflow_runs SET status = :status, completed_at = now(), "
                "callback_state = 'pending', callback_next_at = now(), "
                "callback_delivery = gen_random_uuid() WHERE id = ANY(:ids)"
            ),
            {"ids": [parse_run_ref(ref) for ref in refs], "status": status},
        )
    return refs


def test_a_sweeper_round_delivers_every_due_callback_batch_after_batch(
    user: Api, sent: Any
) -> None:
    """More callbacks due than one batch: a round delivers them all while it has time (it
    delivered one batch a round, 20 every 5 s, so a busy user's callbacks fell behind)."""
    receiver = CallbackReceiver()
    try:
        count = callbacks.BATCH * 2 + 5
        _due_callbacks(user, [receiver.url] * count)
        callbacks.deliver_due(until=time.monotonic() + 30)
        assert len(receiver.received) == count
    finally:
        receiver.stop()


def test_a_sweeper_round_ends_on_time_whatever_its_receivers_do(user: Api, sent: Any) -> None:
    """Receivers that pace their answers a byte at a time: every try of the round ends by
    its `until`, and so does the round (it used to take up to 30 s a batch, and the
    scheduled sweeper, whose other work waits for it, has 60 s)."""
    receivers = [TricklingServer("head") for _ in range(3)]
    try:
        refs = _due_callbacks(user, [r.url for r in receivers])
        started = time.monotonic()
        callbacks.deliver_due(until=started + 3)
        assert time.monotonic() - started < 4.5
        for ref in refs:
            state = user.get(f"/workflows/{ref}").json()["data"]["callback"]
            assert (state["state"], state["attempts"]) == ("pending", 1), state
    finally:
        for receiver in receivers:
            receiver.stop.set()


def test_a_callback_a_round_had_no_time_to_try_keeps_its_attempts_and_its_place(
    user: Api, api: Api, sent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another user's receivers, due first, trickle their answers and hold every post of
    the round to its end: a callback whose turn comes after them is not tried, so it uses
    up no attempt and is due again at once. It used to count as a failed try ("could not
    reach the callback URL", TimeoutError) with backoff: eight such rounds abandoned a
    healthy receiver that never got a request."""
    slow = [TricklingServer("head") for _ in range(callbacks.CONCURRENT_POSTS)]
    receiver = CallbackReceiver()
    try:
        _due_callbacks(api.as_new_user(), [s.url for s in slow])
        (ref,) = _due_callbacks(user, [receiver.url])  # due after theirs
        take_due = callbacks._take_due  # and taken after them, whatever the order (tested below)
        monkeypatch.setattr(
            callbacks,
            "_take_due",
            lambda: sorted(take_due(), key=lambda row: row.callback_url == receiver.url),
        )
        callbacks.deliver_due(until=time.monotonic() + 3)
        state = user.get(f"/workflows/{ref}").json()["data"]["callback"]
        assert (state["state"], state["attempts"], state["lastError"]) == ("pending", 0, None)
        assert receiver.received == []
        for server in slow:
            server.stop.set()
        callbacks.deliver_due(until=time.monotonic() + 10)  # the next round: due, no backoff
        state = user.get(f"/workflows/{ref}").json()["data"]["callback"]
        assert (state["state"], state["attempts"]) == ("delivered", 1), state
        assert len(receiver.received) == 1
    finally:
        receiver.stop()
        for server in slow:
            server.stop.set()


def test_one_users_unanswering_receivers_hold_back_no_other_users_callback(
    user: Api, api: Api, sent: Any
) -> None:
    """Due callbacks were taken oldest first, whoever's: receivers of one user that take
    the connection and never answer, due ahead of another user's callback, held every
    post of a round to its end, round after round, and the other user's healthy receiver
    waited behind all of them (a round tries CONCURRENT_POSTS of them; ended runs are not
    under MAOF_MAX_ACTIVE_RUNS, so there can be any number). Users now take turns: the
    next round tries every user's oldest due callback before anyone's second."""
    tarpit, receiver = Tarpit(), CallbackReceiver()
    try:
        _due_callbacks(api.as_new_user(), [tarpit.url] * (3 * callbacks.CONCURRENT_POSTS))
        (ref,) = _due_callbacks(user, [receiver.url])  # due after all of theirs
        started = time.monotonic()
        callbacks.deliver_due(until=started + 3)  # one round
        assert time.monotonic() - started < 4.5
        state = user.get(f"/workflows/{ref}").json()["data"]["callback"]
        assert (state["state"], state["attempts"]) == ("delivered", 1), state
        assert len(receiver.received) == 1
    finally:
        tarpit.stop()
        receiver.stop()


def test_due_callbacks_are_taken_oldest_first(user: Api, sent: Any) -> None:
    """A round starts a batch's tries in the order they were taken, and the last may not
    start before the round ends: the oldest due come first. The UPDATE that takes them
    returned them in the table's order, whatever its ORDER BY."""
    refs = _due_callbacks(user, ["http://127.0.0.1:9/hooks"] * 3)
    ids = [parse_run_ref(ref) for ref in refs]
    with session_scope() as session:  # the first submitted is the last due
        session.execute(
            text(
                "UPDATE workflow_runs SET callback_next_at = now() - make_interval(secs => :ago) "
                "WHERE id = :id"
            ),
            [{"id": run_id, "ago": ago} for run_id, ago in zip(ids, (10, 20, 30), strict=True)],
        )
    taken = [row.id for row in callbacks._take_due() if row.id in ids]
    assert taken == ids[::-1]


def test_a_pending_callback_is_signed_after_the_secret_key_rotates(
    user: Api, sent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Callback secrets are encrypted with MAOF_SECRET_KEY like agent tokens: a rotation done
    as docs/security.md says (the old key kept as previous, re-encrypt, then drop it) must
    leave them readable. Re-encryption moved the agent tokens only, and every callback still
    pending (or re-armed by a retry) failed with InvalidToken once the old key was gone."""
    old, new = get_settings().secret_key, "rotated-secret-key-" + "c" * 32
    receiver = CallbackReceiver()
    try:
        (ref,) = _due_callbacks(user, [receiver.url])
        monkeypatch.setenv("MAOF_SECRET_KEY", new)
        monkeypatch.setenv("MAOF_PREVIOUS_SECRET_KEYS", old)
        reset_settings()
        assert reencrypt_all().rewritten >= 1
        monkeypatch.setenv("MAOF_PREVIOUS_SECRET_KEYS", "")  # the previous key retired
        reset_settings()
        callbacks.deliver_due()
        state = user.get(f"/workflows/{ref}").json()["data"]["callback"]
        assert state["state"] == "delivered", state
        ((headers, raw),) = receiver.received
        expected = "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["X-Maof-Signature"], expected)
    finally:
        receiver.stop()
        restore_secret_key(monkeypatch, old, new)


def stored_callback_secret(ref: str) -> str | None:
    with session_scope() as session:
        return session.execute(
            text("SELECT callback_secret_encrypted FROM workflow_runs WHERE id = :id"),
            {"id": parse_run_ref(ref)},
        ).scalar()


def test_a_callback_secret_is_cleared_once_its_run_can_end_no_more(
    user: Api, sent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run's callback secret stayed stored (and was re-encrypted at every key rotation)
    for as long as the database lived. Once a completed run's callback is delivered or
    given up, nothing signs with it again (a completed run is never retried): it is
    cleared. A failed or cancelled run's is kept, and signs the callback of a retry's end."""
    monkeypatch.setattr(control, "send_stage_messages", sent)  # the retry's stages stay queued
    receiver = CallbackReceiver()
    try:
        delivered, given_up = _due_callbacks(
            user, [receiver.url, "http://127.0.0.1:9/hooks"], status="completed"
        )
        (cancelled,) = _due_callbacks(user, [receiver.url])
        with session_scope() as session:  # its last try
            session.execute(
                text("UPDATE workflow_runs SET callback_attempts = :n WHERE id = :id"),
                {"n": callbacks.MAX_ATTEMPTS - 1, "id": parse_run_ref(given_up)},
            )
        callbacks.deliver_due(until=time.monotonic() + 20)  # those due before too
        states = {
            ref: user.get(f"/workflows/{ref}").json()["data"]["callback"]["state"]
            for ref in (delivered, given_up, cancelled)
        }
        assert list(states.values()) == ["delivered", "failed", "delivered"], states
        assert stored_callback_secret(delivered) is None
        assert stored_callback_secret(given_up) is None
        assert stored_callback_secret(cancelled) is not None
        assert user.post(f"/workflows/{cancelled}/retry").status_code == 202
        assert user.post(f"/workflows/{cancelled}/cancel").status_code == 202
        callbacks.deliver_due(until=time.monotonic() + 20)
        assert len(receiver.received) == 3
        headers, raw = receiver.received[-1]
        assert json.loads(raw)["workflowRunId"] == cancelled
        expected = "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["X-Maof-Signature"], expected)
    finally:
        receiver.stop()


def test_a_callback_url_the_guard_refuses_is_400(
    user: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAOF_ALLOW_PRIVATE_AGENT_ENDPOINTS", "false")
    from chalicelib.config import reset_settings

    reset_settings()
    try:
        body = dict(
            pipeline(unique_capability(), unique_capability()),
            callback={"url": "http://169.254.169.254/latest", "secret": SECRET},
        )
        response = user.post("/workflows/execute", body)
        assert response.status_code == 400
        assert response.json()["error"]["details"][0]["field"] == "callback.url"
    finally:
        monkeypatch.undo()
        reset_settings()


def test_cancelled_runs_are_listed_by_their_status(
    user: Api, poller: Any, agents: list[ScriptedAgent]
) -> None:
    slow = start(agents, default=sleep(1.0))
    capability = unique_capability("listed")
    register_agent(user, capability, endpoint=slow.url)
    run_id = submitted(user, pipeline(capability, capability))
    assert user.post(f"/workflows/{run_id}/cancel").status_code == 202
    listed = user.get("/workflows", params={"status": "cancelled"}).json()["data"]
    assert [r["workflowRunId"] for r in listed["runs"]] == [run_id]
    assert listed["runs"][0]["status"] == "cancelled"
