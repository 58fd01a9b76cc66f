"""Run control in the dashboard: cancelling a running run and retrying a failed one from its
page, and the New workflow page's deadline, callback and idempotent submission."""

from __future__ import annotations

import json
import re
import threading
from datetime import datetime
from typing import Any

from playwright.sync_api import Page, Request, Route, expect

from chalicelib.engine import callbacks
from tests.browser.conftest import screenshot, sign_in, unique
from tests.integration.conftest import Api, register_agent, wait_for_run, wait_until
from tests.support.agents import ScriptedAgent, error, gated
from tests.support.agents import start_agent as start
from tests.support.callbacks import CallbackReceiver

SECRET = "a-callback-secret-0123456789"


def submitted(client: Api, first: str, second: str) -> str:
    """A run of two stages, `b` after `a`, needing the two capabilities."""
    stages = [
        {"id": "a", "name": "First", "agentCapability": first},
        {"id": "b", "name": "Second", "agentCapability": second, "dependencies": ["a"]},
    ]
    body = {"workflow": {"name": unique("control"), "stages": stages}, "input": {"text": "hi"}}
    response = client.post("/workflows/execute", body)
    assert response.status_code == 202, response.text
    return str(response.json()["data"]["workflowRunId"])


def run_status(page: Page) -> Any:
    return page.get_by_test_id("run-status").locator(".badge")


def node(page: Page, stage_id: str) -> Any:
    return page.locator(f'.dag-node[data-stage-id="{stage_id}"]')


def test_a_running_run_is_cancelled_from_its_page_and_the_page_stops_polling(
    page: Page, dashboard_url: str, user: Api, poller: object, agents: list[ScriptedAgent]
) -> None:
    slow = start(agents, default=gated(threading.Event()))  # answers as the agent stops
    first, second = unique("slow"), unique("later")
    register_agent(user, first, endpoint=slow.url)
    register_agent(user, second)
    run_id = submitted(user, first, second)
    sign_in(page, dashboard_url, user, f"#/runs/{run_id}")
    expect(node(page, "a")).to_have_attribute("data-status", "in_progress")
    expect(page.get_by_role("button", name="Retry run")).to_have_count(0)

    # Keeping it running changes nothing.
    cancel = page.get_by_role("button", name="Cancel run")
    cancel.click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("Cancel this run?")
    dialog.get_by_role("button", name="Keep running").click()
    expect(dialog).to_have_count(0)
    assert user.get(f"/workflows/{run_id}").json()["data"]["status"] == "in_progress"

    cancel.click()
    page.get_by_role("dialog").get_by_role("button", name="Cancel run").click()
    expect(run_status(page)).to_have_attribute("data-status", "cancelled", timeout=5_000)
    expect(run_status(page)).to_have_text("Cancelled")
    expect(page.locator(".toast").first).to_contain_text("Run cancelled: 1 stage will not run")
    email = user.user["email"]
    expect(page.get_by_test_id("run-error")).to_contain_text("This run was cancelled")
    expect(page.get_by_test_id("run-error")).to_contain_text(f"Cancelled by {email}")
    # The stage that had not started is cancelled; the running one ends when its agent answers.
    expect(node(page, "b")).to_have_attribute("data-status", "cancelled")
    expect(node(page, "a")).to_have_attribute("data-status", "in_progress")
    expect(node(page, "a")).to_contain_text("Ending: run cancelled")
    expect(page.locator(".dag-legend__item--cancelled")).to_have_text("Cancelled")
    expect(page.get_by_test_id("live")).to_have_count(0)
    expect(page.get_by_test_id("run-result")).to_contain_text("The run was cancelled")
    expect(page.get_by_role("button", name="Cancel run")).to_have_count(0)
    expect(page.get_by_role("button", name="Retry run")).to_be_visible()
    cancelled = page.locator(".audit__entry--cancel")
    expect(cancelled).to_contain_text(f"Cancelled by {email}")
    expect(cancelled).to_contain_text("Not started, now cancelled: b")
    screenshot(page, "run-cancelled")

    # A cancelled run is not live: the page reads it no more.
    reads: list[str] = []

    def count(request: Request) -> None:
        if request.method == "GET" and request.url.endswith(f"/workflows/{run_id}"):
            reads.append(request.url)

    page.on("request", count)
    page.wait_for_timeout(2_500)
    assert reads == []

    # It is listed under its own filter.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Workflows").click()
    page.get_by_role("link", name="Cancelled").click()
    expect(page).to_have_url(re.compile(r"#/workflows\?status=cancelled$"))
    row = page.locator(f'tr[data-run-id="{run_id}"]')
    expect(row).to_have_attribute("data-status", "cancelled")
    expect(row.locator(".badge")).to_have_text("Cancelled")


def test_a_failed_run_is_retried_from_its_page_and_completes(
    page: Page, dashboard_url: str, user: Api, poller: object, agents: list[ScriptedAgent]
) -> None:
    flaky = start(agents)
    # Fails once, then answers when let go, so the page is seen watching the run again.
    answer = threading.Event()
    flaky.script.extend([error("BROKEN", retryable=False), gated(answer)])
    first, second = unique("steady"), unique("flaky")
    register_agent(user, first)
    register_agent(user, second, endpoint=flaky.url)
    run_id = submitted(user, first, second)
    assert wait_for_run(user, run_id)["status"] == "failed"

    sign_in(page, dashboard_url, user, f"#/runs/{run_id}")
    expect(run_status(page)).to_have_attribute("data-status", "failed")
    expect(page.get_by_role("button", name="Cancel run")).to_have_count(0)
    page.get_by_role("button", name="Retry run").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("Completed stages keep their outputs")
    dialog.get_by_role("button", name="Retry run").click()
    expect(page.locator(".toast").first).to_contain_text("Run retried: 1 stage queued again")

    # The page watches the run again until it completes.
    expect(node(page, "b")).to_have_attribute("data-status", "in_progress")
    expect(page.get_by_test_id("live")).to_be_visible()
    expect(page.get_by_test_id("run-result")).to_contain_text("appears when the run completes")
    answer.set()
    expect(run_status(page)).to_have_attribute("data-status", "completed", timeout=20_000)
    expect(page.get_by_test_id("live")).to_have_count(0)
    expect(node(page, "a")).to_have_attribute("data-status", "completed")
    expect(node(page, "b")).to_have_attribute("data-status", "completed")
    expect(page.get_by_test_id("run-error")).to_be_empty()
    expect(page.get_by_test_id("run-result")).to_contain_text('"echo"')
    expect(page.get_by_role("button", name="Retry run")).to_have_count(0)
    retried = page.locator(".audit__entry--retry-run")
    expect(retried).to_contain_text(f"Retried by {user.user['email']}")
    expect(retried).to_contain_text("Was failed; run again: b")
    expect(page.locator(".audit__entry--fail")).to_contain_text("scripted")
    expect(page.get_by_test_id("audit-chain")).to_have_attribute("data-valid", "true")
    assert len(flaky.calls) == 2
    screenshot(page, "run-retried")


def test_cancelling_a_run_that_ended_meanwhile_says_so_and_shows_it(
    page: Page, dashboard_url: str, user: Api, poller: object, agents: list[ScriptedAgent]
) -> None:
    answer = threading.Event()  # the stages answer only once the cancel dialog is open
    slow = start(agents, default=gated(answer))
    capability = unique("quick")
    register_agent(user, capability, endpoint=slow.url)
    run_id = submitted(user, capability, capability)
    sign_in(page, dashboard_url, user, f"#/runs/{run_id}")
    expect(node(page, "a")).to_have_attribute("data-status", "in_progress")
    page.get_by_role("button", name="Cancel run").click()
    expect(page.get_by_role("dialog")).to_be_visible()
    answer.set()
    assert wait_for_run(user, run_id)["status"] == "completed"  # while the dialog is open
    page.get_by_role("dialog").get_by_role("button", name="Cancel run").click()
    expect(page.locator(".toast", has_text="The run has already ended")).to_be_visible()
    expect(run_status(page)).to_have_attribute("data-status", "completed")
    expect(page.get_by_role("button", name="Cancel run")).to_have_count(0)
    expect(page.get_by_role("button", name="Retry run")).to_have_count(0)


def field(page: Page, path: str) -> Any:
    return page.locator(f'.field[data-field="{path}"]')


def test_the_new_workflow_page_sends_a_deadline_and_a_callback_and_makes_one_run(
    page: Page, dashboard_url: str, api_url: str, user: Api, poller: object
) -> None:
    capability = unique("options")
    register_agent(user, capability)
    receiver = CallbackReceiver()
    try:
        sign_in(page, dashboard_url, user, "#/workflows/new")
        name = unique("with-options")
        stages = [{"id": "only", "name": "Only", "agentCapability": capability}]
        page.get_by_label("Workflow definition").fill(json.dumps({"name": name, "stages": stages}))
        page.get_by_label("Input", exact=True).fill('{"text": "hi"}')
        run = page.get_by_role("button", name="Run workflow")

        # Checked here: the URL and the secret together, the secret's length, the deadline.
        page.get_by_label("Callback URL").fill(receiver.url)
        run.click()
        expect(field(page, "callback.secret")).to_contain_text("Give a secret")
        page.get_by_label("Callback secret").fill("too-short")
        page.get_by_label("Deadline", exact=True).fill("90000")  # seconds: over 24 h
        run.click()
        expect(field(page, "callback.secret")).to_contain_text("16 to 1,024 characters")
        expect(field(page, "workflow.timeoutMs")).to_contain_text("from 100 ms to 24 hours")
        expect(page).to_have_url(re.compile(r"#/workflows/new$"))

        # Checked by the API: a URL its guard refuses, shown on the URL field.
        page.get_by_label("Deadline", exact=True).fill("30")
        page.get_by_label("Callback secret").fill(SECRET)
        page.get_by_label("Callback URL").fill("http://169.254.169.254/latest")
        run.click()
        expect(field(page, "callback.url")).to_contain_text("not allowed")
        expect(field(page, "callback.url").locator("input")).to_have_attribute(
            "aria-invalid", "true"
        )
        expect(page).to_have_url(re.compile(r"#/workflows/new$"))
        screenshot(page, "new-workflow-options")

        # The first answer is lost; the same submission is sent again, double-clicked.
        page.get_by_label("Callback URL").fill(receiver.url)
        expect(field(page, "callback.url").locator("input")).not_to_have_attribute(
            "aria-invalid", "true"
        )
        keys: list[str | None] = []
        lost: list[dict[str, Any]] = []

        def lose_the_first_answer(route: Route) -> None:
            if route.request.method == "OPTIONS":
                route.continue_()
                return
            keys.append(route.request.headers.get("idempotency-key"))
            if lost:
                route.continue_()
                return
            lost.append(route.fetch().json())  # the API made the run; the page never hears
            route.abort("connectionreset")

        page.route(f"{api_url}/workflows/execute", lose_the_first_answer)
        run.click()
        expect(page.get_by_test_id("workflow-messages")).to_contain_text("Sending it again is safe")
        run.dblclick()
        expect(page).to_have_url(re.compile(r"#/runs/wfr-[0-9a-f-]+$"))
        run_id = page.url.rsplit("/", 1)[1]
        assert lost[0]["data"]["workflowRunId"] == run_id
        assert len(keys) >= 2 and keys[0] and set(keys) == {keys[0]}
        runs = user.get("/workflows", params={"limit": 100}).json()["data"]["runs"]
        assert [r["workflowRunId"] for r in runs if r["workflowName"] == name] == [run_id]

        detail = user.get(f"/workflows/{run_id}").json()["data"]
        created = datetime.fromisoformat(detail["createdAt"])
        deadline = datetime.fromisoformat(detail["deadlineAt"])
        assert 29 <= (deadline - created).total_seconds() <= 31
        assert detail["callback"]["url"] == receiver.url
        assert SECRET not in json.dumps(detail)

        # The run's facts show the deadline and the callback, then its delivery.
        expect(page.get_by_test_id("run-deadline")).to_be_visible()
        expect(page.get_by_test_id("callback-url")).to_have_text(receiver.url)
        expect(run_status(page)).to_have_attribute("data-status", "completed", timeout=20_000)
        expect(page.get_by_test_id("callback-state")).to_have_attribute("data-state", "pending")

        def delivered() -> bool:
            callbacks.deliver_due()  # what the sweeper does every round
            return bool(receiver.received)

        wait_until(delivered, timeout=10, interval=0.2)
        page.reload()
        state = page.get_by_test_id("callback-state")
        expect(state).to_have_attribute("data-state", "delivered")
        expect(state).to_have_text("Delivered · 1 attempt")
        screenshot(page, "run-with-callback")
    finally:
        receiver.stop()
