"""The dashboard in a real browser: served by LocalStack S3, talking to the API over CORS."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import requests
from playwright.sync_api import Browser, Page, Route, expect

from tests.browser.conftest import (
    AgentServer,
    screenshot,
    sign_in,
    store_session,
    stored_session,
    unique,
)
from tests.integration.conftest import Api, free_port, register_agent, wait_for_run

PASSWORD = "correct-horse-battery"
COMPLETED_GREEN = "rgb(22, 163, 74)"


def three_stage_workflow(name: str, capabilities: list[str]) -> dict[str, object]:
    extract, translate, summarize = capabilities
    return {
        "name": name,
        "stages": [
            {"id": "extract", "name": "Extract key points", "agentCapability": extract},
            {
                "id": "translate",
                "name": "Translate to Spanish",
                "agentCapability": translate,
                "dependencies": ["extract"],
                "input": {"text": "${extract.output.result}", "to": "${workflow.input.language}"},
            },
            {
                "id": "summarize",
                "name": "Summarize",
                "agentCapability": summarize,
                "dependencies": ["translate"],
            },
        ],
    }


def submit_from_editor(page: Page, workflow: dict[str, object], workflow_input: object) -> str:
    """Fill the New workflow page, run it, and return the run id it jumps to."""
    page.get_by_label("Workflow definition").fill(json.dumps(workflow, indent=2))
    page.get_by_label("Input", exact=True).fill(json.dumps(workflow_input))
    page.get_by_role("button", name="Run workflow").click()
    expect(page).to_have_url(re.compile(r"#/runs/wfr-[0-9a-f-]+$"))
    return page.url.rsplit("/", 1)[1]


def test_register_sign_in_register_an_agent_run_a_workflow_and_watch_it_complete(
    page: Page, dashboard_url: str, api_url: str, poller: object, agent_server: AgentServer
) -> None:
    email = f"{unique('browser')}@example.com"

    # Create an account, then come back to sign in, as in the seed.
    page.goto(dashboard_url)
    expect(page).to_have_url(re.compile(r"#/login$"))
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.get_by_role("link", name="Create one").click()
    page.get_by_label("Name").fill("Ada Lovelace")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Create account").click()
    expect(page).to_have_url(re.compile(r"#/login$"))
    expect(page.get_by_test_id("flash")).to_contain_text("Account created")
    expect(page.get_by_label("Email")).to_have_value(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_label("Password").press("Enter")

    # The overview shows the same numbers as the API.
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    expect(page.get_by_test_id("user-name")).to_have_text("Ada Lovelace")
    login = Api(api_url).post("/auth/login", {"email": email, "password": PASSWORD})
    client = Api(api_url, token=login.json()["data"]["accessToken"])
    agents_total = client.get("/agents", params={"limit": 1}).json()["data"]["meta"]["total"]
    online_total = client.get("/agents", params={"limit": 1, "status": "online"}).json()["data"]
    expect(page.get_by_test_id("stat-agents")).to_have_text(str(agents_total))
    expect(page.get_by_test_id("stat-online")).to_have_text(str(online_total["meta"]["total"]))
    expect(page.get_by_test_id("stat-runs")).to_have_text("0")
    expect(page.get_by_test_id("stat-failure-rate")).to_have_text("—")
    screenshot(page, "overview-new-user")

    # Register an agent with three capabilities (no other test uses them) from the Agents page.
    capabilities = ["key-points", "translation.es", "summarization.short"]
    agent_id = "pipeline-agent"
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Agents").click()
    expect(page.get_by_role("heading", name="Agents", exact=True)).to_be_visible()
    page.get_by_role("button", name="Register agent").first.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Name").fill("Pipeline Agent")
    dialog.get_by_label("Agent ID").fill(agent_id)
    dialog.get_by_label("Endpoint").fill(agent_server.url)
    dialog.get_by_label("Auth token").fill("browser-agent-token")
    dialog.get_by_label("Capabilities").fill(", ".join(capabilities))
    dialog.get_by_role("button", name="Register agent").click()
    expect(dialog).to_be_hidden()
    row = page.locator(f'tr[data-agent-id="{agent_id}"]')
    expect(row).to_contain_text("Pipeline Agent")
    expect(row).to_contain_text(capabilities[1])
    expect(row.locator(".badge")).to_have_attribute("data-status", "online")
    screenshot(page, "agents")

    # Submit a 3-stage workflow from the New workflow page.
    page.get_by_role("link", name="New workflow").first.click()
    workflow = three_stage_workflow("extract-translate-summarize", capabilities)
    page.get_by_label("Workflow definition").fill(json.dumps(workflow, indent=2))
    for capability in capabilities:
        expect(page.locator(f'[data-capability="{capability}"]')).to_contain_text("1 agent")
    run_id = submit_from_editor(page, workflow, {"text": "Agents in a pipeline.", "language": "es"})

    # Its run page reaches `completed` with every node green.
    expect(page.get_by_test_id("run-status").locator(".badge")).to_have_attribute(
        "data-status", "completed", timeout=20_000
    )
    nodes = page.locator(".dag-node")
    expect(nodes).to_have_count(3)
    expect(page.locator('.dag-node[data-status="completed"]')).to_have_count(3)
    for index in range(3):
        badge = nodes.nth(index).locator(".dag-node__badge")
        expect(badge).to_have_css("fill", COMPLETED_GREEN)
    expect(page.get_by_role("heading", name="extract-translate-summarize")).to_be_visible()
    expect(page.get_by_test_id("run-result")).to_contain_text(f"{capabilities[2]} result")

    # Open a stage's output.
    page.locator('.dag-node[data-stage-id="translate"]').click()
    panel = page.get_by_test_id("stage-panel")
    expect(panel).to_have_attribute("data-stage-id", "translate")
    expect(panel.get_by_test_id("stage-agent")).to_have_text(agent_id)
    panel.get_by_role("tab", name="Input").click()
    expect(panel.get_by_role("tabpanel")).to_contain_text(f"{capabilities[0]} result")
    panel.get_by_role("tab", name="Output").click()
    expect(panel.get_by_role("tabpanel")).to_contain_text('"result"')
    expect(panel.get_by_role("tabpanel")).to_contain_text(f"{capabilities[1]} result")

    # The audit trail's hash chain is shown valid.
    chain = page.get_by_test_id("audit-chain")
    expect(chain).to_have_attribute("data-valid", "true")
    expect(chain).to_contain_text("Hash chain valid")
    audit = client.get(f"/workflows/{run_id}/audit").json()["data"]
    expect(page.locator(".audit__entry")).to_have_count(audit["chain"]["length"])
    page.locator('.dag-node[data-stage-id="summarize"]').click()
    expect(panel).to_have_attribute("data-stage-id", "summarize")
    screenshot(page, "run-detail", docs=True)

    # The run is listed on the Workflows page, and the overview counts it.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Workflows").click()
    expect(page.locator(f'tr[data-run-id="{run_id}"]')).to_have_attribute(
        "data-status", "completed"
    )
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Overview").click()
    expect(page.get_by_test_id("stat-runs")).to_have_text("1")
    expect(page.get_by_test_id("stat-failure-rate")).to_have_text("0%")
    screenshot(page, "overview")

    # Sign out: back to sign-in, and the pages are closed again.
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile(r"#/login$"))
    expect(page.get_by_test_id("flash")).to_contain_text("signed out")
    page.goto(dashboard_url + "#/workflows")
    expect(page).to_have_url(re.compile(r"#/login$"))


def test_a_run_needing_a_capability_no_agent_has_fails_with_the_reason_on_its_page(
    page: Page, dashboard_url: str, user: Api, poller: object
) -> None:
    present = unique("present")
    missing = unique("nobody")
    register_agent(user, present)
    sign_in(page, dashboard_url, user, "#/workflows/new")
    workflow = {
        "name": "doomed-pipeline",
        "stages": [
            {"id": "first", "name": "First", "agentCapability": present},
            {
                "id": "second",
                "name": "Needs a missing agent",
                "agentCapability": missing,
                "dependencies": ["first"],
            },
            {
                "id": "third",
                "name": "Never runs",
                "agentCapability": present,
                "dependencies": ["second"],
            },
        ],
    }
    page.get_by_label("Workflow definition").fill(json.dumps(workflow))
    expect(page.locator(f'[data-capability="{missing}"]')).to_contain_text("no agent")
    submit_from_editor(page, workflow, {"text": "hello"})

    expect(page.get_by_test_id("run-status").locator(".badge")).to_have_attribute(
        "data-status", "failed", timeout=20_000
    )
    reason = f"No available agent has the capability '{missing}'"
    expect(page.get_by_test_id("run-error")).to_contain_text("This run failed")
    expect(page.get_by_test_id("run-error")).to_contain_text(reason)
    expect(page.locator('.dag-node[data-stage-id="first"]')).to_have_attribute(
        "data-status", "completed"
    )
    expect(page.locator('.dag-node[data-stage-id="second"]')).to_have_attribute(
        "data-status", "failed"
    )
    expect(page.locator('.dag-node[data-stage-id="third"]')).to_have_attribute(
        "data-status", "skipped"
    )
    panel = page.get_by_test_id("stage-panel")
    expect(panel).to_have_attribute("data-stage-id", "second")
    expect(panel).to_contain_text(reason)
    expect(page.get_by_test_id("run-result")).to_contain_text("No result")
    screenshot(page, "run-failed")


def test_the_new_workflow_page_checks_definitions_here_and_shows_the_apis_400_details(
    page: Page, dashboard_url: str, user: Api
) -> None:
    sign_in(page, dashboard_url, user, "#/workflows/new")
    cyclic = {
        "name": "loop",
        "stages": [
            {"id": "a", "name": "A", "agentCapability": "summarization", "dependencies": ["b"]},
            {"id": "b", "name": "B", "agentCapability": "Not A Tag", "dependencies": ["a"]},
        ],
    }
    page.get_by_label("Workflow definition").fill(json.dumps(cyclic))
    page.get_by_role("button", name="Run workflow").click()
    messages = page.get_by_test_id("workflow-messages")
    expect(messages).to_contain_text("Stages form a cycle: a -> b -> a")
    expect(messages).to_contain_text("stage 2 (b) \u203a agentCapability")
    expect(page).to_have_url(re.compile(r"#/workflows/new$"))

    page.get_by_label("Workflow definition").fill('{"name": "broken", "stages": [')
    page.get_by_role("button", name="Validate").click()
    expect(messages).to_contain_text("Not valid JSON")

    # Only the API refuses NUL characters: its 400 details are shown, naming the field.
    valid = {
        "name": "nul",
        "stages": [{"id": "a", "name": "A", "agentCapability": "summarization"}],
    }
    page.get_by_label("Workflow definition").fill(json.dumps(valid))
    page.get_by_label("Input", exact=True).fill('{"text": "a\\u0000b"}')
    page.get_by_role("button", name="Validate").click()
    expect(messages).to_contain_text("The definition is valid")
    page.get_by_role("button", name="Run workflow").click()
    expect(messages).to_contain_text("The API refused this workflow")
    expect(messages).to_contain_text("must not contain NUL characters")
    expect(page).to_have_url(re.compile(r"#/workflows/new$"))


def test_the_new_workflow_page_refuses_a_number_json_cannot_write_rather_than_send_null(
    page: Page, dashboard_url: str, user: Api
) -> None:
    """JSON.parse reads 1e400 as Infinity, js-yaml `.inf` and `.nan` as Infinity and NaN,
    and JSON.stringify writes them as null: the API refuses `{"x": 1e400}`, but the page
    ran the workflow on `{"x": null}`, and Format wrote null into the editor."""
    sign_in(page, dashboard_url, user, "#/workflows/new")
    stage = {"id": "a", "name": "A", "agentCapability": "summarization"}
    page.get_by_label("Workflow definition").fill(json.dumps({"name": "n", "stages": [stage]}))
    editor = page.get_by_label("Input", exact=True)
    messages = page.get_by_test_id("workflow-messages")
    for text, says in (
        ('{"a": 1e400}', "a is Infinity"),
        ('{"b": [1, -1e999]}', "b.1 is -Infinity"),
        ("c: .inf", "c is Infinity"),
        ("d: .nan", "d is NaN"),
    ):
        editor.fill(text)
        page.get_by_role("button", name="Format JSON").click()
        expect(editor).to_have_value(text)
        page.get_by_role("button", name="Run workflow").click()
        expect(messages).to_contain_text(f"{says}, and JSON has no NaN or infinite numbers")
        expect(page).to_have_url(re.compile(r"#/workflows/new$"))
    assert user.get("/workflows").json()["data"]["runs"] == []  # nothing was submitted


def test_names_and_passwords_are_limited_in_characters_as_the_api_counts_them(
    page: Page, dashboard_url: str, api_url: str
) -> None:
    """Emoji are one character to the API (Python's len()) but two UTF-16 units to
    `String.length` and to an input's maxlength: the forms count what the API counts."""
    name = "\U0001f600" * 255  # 510 UTF-16 units
    password = "\U0001f511" * 100  # 200 UTF-16 units, 400 bytes
    email = f"{unique('emoji')}@example.com"
    capability = unique("emoji")
    page.goto(dashboard_url + "#/register")
    page.get_by_label("Name").fill(name)
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Create account").click()
    expect(page.get_by_test_id("flash")).to_contain_text("Account created")
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_test_id("user-name")).to_have_text(name)
    login = Api(api_url).post("/auth/login", {"email": email, "password": password})
    client = Api(api_url, token=login.json()["data"]["accessToken"])

    # An agent whose name, id and description are as long as the API allows.
    page.goto(dashboard_url + "#/agents")
    page.get_by_role("button", name="Register agent").first.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Name").fill(name + "\U0001f600")
    dialog.get_by_label("Agent ID").fill("\U0001f916" * 255)
    dialog.get_by_label("Endpoint").fill("mock://emoji-agent")
    dialog.get_by_label("Auth token").fill("agent-secret-token")
    dialog.get_by_label("Capabilities").fill(capability)
    dialog.get_by_label("Description (optional)").fill("\U0001f4dd" * 2000)
    dialog.get_by_role("button", name="Register agent").click()
    expect(dialog.locator('[data-field="name"]')).to_contain_text("must be at most 255 characters")
    dialog.get_by_label("Name").fill(name)
    dialog.get_by_role("button", name="Register agent").click()
    expect(dialog).to_be_hidden()
    agents = client.get("/agents", params={"capability": capability}).json()["data"]["agents"]
    assert [(a["name"], a["agentId"], a["description"]) for a in agents] == [
        (name, "\U0001f916" * 255, "\U0001f4dd" * 2000)
    ]

    # A workflow and a stage named with 255 of them are checked here and run.
    page.goto(dashboard_url + "#/workflows/new")
    workflow = {"name": name, "stages": [{"id": "a", "name": name, "agentCapability": capability}]}
    page.get_by_label("Workflow definition").fill(json.dumps(workflow, ensure_ascii=False))
    page.get_by_label("Input", exact=True).fill("{}")
    page.get_by_role("button", name="Validate").click()
    expect(page.get_by_test_id("workflow-messages")).to_contain_text("The definition is valid")
    page.get_by_role("button", name="Run workflow").click()
    expect(page).to_have_url(re.compile(r"#/runs/wfr-[0-9a-f-]+$"))


def _refuse(route: Route) -> None:
    """Answer as the API does to an access token it no longer accepts (expired, say)."""
    if route.request.method == "OPTIONS":  # the CORS preflight
        route.continue_()
        return
    body = {"success": False, "error": {"code": "UNAUTHORIZED", "message": "Token has expired"}}
    route.fulfill(
        status=401,
        headers={"Access-Control-Allow-Origin": "*", "Content-Type": "application/json"},
        body=json.dumps(body),
    )


def test_tokens_refresh_silently_and_an_expired_session_returns_to_sign_in(
    page: Page, dashboard_url: str, user: Api, api_url: str
) -> None:
    sign_in(page, dashboard_url, user, "#/workflows")
    expect(page.get_by_role("heading", name="Workflows")).to_be_visible()
    before = stored_session(page)
    assert before is not None

    # An access token the API refuses is replaced from the refresh token, unseen; the
    # refresh token the answer carries replaces the stored one.
    refused: list[str] = []

    def refuse_once(route: Route) -> None:
        if route.request.method != "OPTIONS" and not refused:
            refused.append(route.request.headers["authorization"])
            _refuse(route)
        else:
            route.continue_()

    agents = re.compile(re.escape(f"{api_url}/agents") + r"(\?.*)?$")
    page.route(agents, refuse_once)
    with page.expect_request(f"{api_url}/auth/refresh") as refresh:
        page.get_by_role("navigation", name="Main").get_by_role("link", name="Agents").click()
    expect(page.get_by_role("heading", name="Agents", exact=True)).to_be_visible()
    expect(page.locator("[data-state=loading]")).to_have_count(0)
    expect(page.locator("[data-state=error]")).to_have_count(0)
    assert refused and json.loads(refresh.value.post_data or "{}") == {
        "refreshToken": before["refreshToken"]
    }
    after = stored_session(page)
    assert after is not None and after["refreshToken"] != before["refreshToken"]
    page.unroute(agents)

    # When the refresh token is refused too, the session has expired: back to sign in.
    store_session(page, {**after, "refreshToken": "expired.refresh.token"})
    page.route(re.compile(re.escape(f"{api_url}/workflows") + r"(\?.*)?$"), _refuse)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Workflows").click()
    expect(page).to_have_url(re.compile(r"#/login$"))
    expect(page.get_by_test_id("flash")).to_contain_text("Your session has expired")
    assert stored_session(page) is None


def test_empty_states_and_phone_width(
    phone_page: Page, dashboard_url: str, user: Api, poller: object
) -> None:
    page = phone_page
    sign_in(page, dashboard_url, user, "#/workflows")
    expect(page.get_by_text("No runs yet")).to_be_visible()
    page.goto(dashboard_url + "#/workflows?status=failed")
    expect(page.get_by_text("No failed runs")).to_be_visible()
    page.goto(dashboard_url + f"#/agents?capability={unique('none')}")
    expect(page.get_by_text("No agents match")).to_be_visible()
    page.goto(dashboard_url + "#/runs/wfr-00000000-0000-0000-0000-000000000000")
    expect(page.get_by_text("Run not found")).to_be_visible()

    # The menu folds away at phone width and opens from its button.
    nav = page.get_by_role("navigation", name="Main")
    expect(nav).to_be_hidden()
    page.get_by_role("button", name="Menu").click()
    nav.get_by_role("link", name="Overview").click()
    expect(page.get_by_test_id("stat-runs")).to_have_text("0")
    expect(nav).to_be_hidden()

    # A run page at phone width: the graph is drawn top to bottom and fits the screen.
    capability = unique("phone")
    register_agent(user, capability)
    stages = [
        {"id": "one", "name": "One", "agentCapability": capability},
        {"id": "two", "name": "Two", "agentCapability": capability, "dependencies": ["one"]},
    ]
    accepted = user.post(
        "/workflows/execute", {"workflow": {"name": "phone-run", "stages": stages}}
    )
    assert accepted.status_code == 202, accepted.text
    page.goto(dashboard_url + f"#/runs/{accepted.json()['data']['workflowRunId']}")
    expect(page.locator('.dag-node[data-status="completed"]')).to_have_count(2, timeout=20_000)
    expect(page.locator(".dag-svg--tb")).to_be_visible()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page scrolls sideways at phone width ({width}px)"
    screenshot(page, "run-detail-phone")


def test_a_run_link_with_a_broken_percent_escape_shows_page_not_found(
    page: Page, dashboard_url: str, user: Api
) -> None:
    sign_in(page, dashboard_url, user, "#/")
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    page.goto(dashboard_url + "#/runs/%E0%A4%A")  # a percent-escape cut short
    main = page.locator("main#main")
    expect(main.get_by_role("heading", name="Page not found")).to_be_visible()
    expect(main).to_contain_text("This link is malformed")
    # The page goes on working (and the fixture fails the test on an uncaught error).
    main.get_by_role("link", name="Go to the overview").click()
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()


def test_the_s3_website_endpoint_serves_the_dashboard(page: Page, dashboard_url: str) -> None:
    from devstack.dashboard import site_urls

    response = requests.get(dashboard_url, timeout=5)
    assert response.headers["Content-Type"].startswith("text/html")
    script = requests.get(dashboard_url.replace("index.html", "js/main.js"), timeout=5)
    assert script.headers["Content-Type"].startswith("text/javascript")

    page.goto(site_urls().website)
    expect(page).to_have_url(re.compile(r"s3-website\.localhost:\d+/#/login$"))
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()


def test_the_run_page_lights_up_stage_by_stage_while_the_run_is_live(
    page: Page, dashboard_url: str, user: Api, poller: object, agent_server: AgentServer
) -> None:
    # Capabilities no other test uses, so every stage goes to the agent server.
    register_agent(
        user,
        "web-research",
        endpoint=agent_server.url,
        agentId="research-agent",
        capabilities=["web-research", "translation.fr", "fact-check", "report-writing"],
    )
    stages = [
        {"id": "research", "name": "Research the topic", "agentCapability": "web-research"},
        {
            "id": "translate",
            "name": "Translate to French",
            "agentCapability": "translation.fr",
            "dependencies": ["research"],
        },
        {
            "id": "check",
            "name": "Check the facts",
            "agentCapability": "fact-check",
            "dependencies": ["research"],
        },
        {
            "id": "report",
            "name": "Write the report",
            "agentCapability": "report-writing",
            "dependencies": ["translate", "check"],
        },
    ]
    accepted = user.post(
        "/workflows/execute",
        {"workflow": {"name": "research-report", "stages": stages}, "input": {"delayMs": 2500}},
    )
    assert accepted.status_code == 202, accepted.text
    sign_in(page, dashboard_url, user, f"#/runs/{accepted.json()['data']['workflowRunId']}")

    first = page.locator('.dag-node[data-stage-id="research"]')
    expect(first).to_have_attribute("data-status", "in_progress")
    expect(page.get_by_test_id("live")).to_be_visible()
    expect(page.locator('.dag-node[data-stage-id="report"]')).to_have_attribute(
        "data-status", "pending"
    )
    expect(page.get_by_test_id("stage-panel")).to_have_attribute("data-stage-id", "research")
    screenshot(page, "run-live", docs=True)

    # Without a reload, the nodes turn green as their stages finish, then the polling stops.
    expect(page.locator('.dag-node[data-status="completed"]')).to_have_count(4, timeout=15_000)
    expect(page.get_by_test_id("run-status").locator(".badge")).to_have_attribute(
        "data-status", "completed"
    )
    expect(page.get_by_test_id("live")).to_have_count(0)
    expect(page.get_by_test_id("audit-chain")).to_have_attribute("data-valid", "true")


def test_a_run_with_a_large_output_is_usable_at_once_and_downloads_whole(
    page: Page, dashboard_url: str, user: Api, poller: object, tmp_path: Path
) -> None:
    # ~440 KB of output (the mock agent echoes its input), under the API's 1 MB limit: some
    # 220,000 JSON tokens, in the stage's input and output and in the run's result.
    capability = unique("echo")
    register_agent(user, capability)
    stages = [{"id": "echo", "name": "Echo", "agentCapability": capability}]
    body = {
        "workflow": {"name": "large-output", "stages": stages},
        "input": {"items": [0] * 220_000},
    }
    accepted = user.post("/workflows/execute", body)
    assert accepted.status_code == 202, accepted.text
    run_id = accepted.json()["data"]["workflowRunId"]
    assert wait_for_run(user, run_id)["status"] == "completed"
    sign_in(page, dashboard_url, user, "#/")
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()

    # Within seconds the page shows the result's start and answers a click (an element per
    # token froze it for 10 s and more).
    started = time.monotonic()
    page.goto(dashboard_url + f"#/runs/{run_id}")
    result = page.get_by_test_id("run-result")
    expect(result.get_by_test_id("json-large-note")).to_contain_text(
        re.compile(r"Showing the first \d+ KB of \d+\.\d MB")
    )
    panel = page.get_by_test_id("stage-panel")
    panel.get_by_role("tab", name="Input").click()
    expect(panel.get_by_role("tab", name="Input")).to_have_attribute("aria-selected", "true")
    expect(panel.get_by_test_id("json-large-note")).to_be_visible()
    elapsed = time.monotonic() - started
    assert elapsed < 5, f"the run page took {elapsed:.1f} s to show and answer"

    # The whole of it is a download away (a blob: link, which the site's policy allows).
    with page.expect_download() as download:
        result.get_by_role("button", name="Download JSON").click()
    assert download.value.suggested_filename == f"{run_id}-result.json"
    saved = tmp_path / "result.json"
    download.value.save_as(saved)
    output = user.get(f"/workflows/{run_id}/result").json()["data"]["output"]
    assert json.loads(saved.read_text()) == output


def test_an_agent_is_deleted_by_its_owner_after_confirming(
    page: Page, dashboard_url: str, user: Api, api: Api, admin: Api
) -> None:
    capability = unique("doomed")
    mine = register_agent(user, capability)
    shared = register_agent(admin, capability, visibility="shared")
    hidden = register_agent(api.as_new_user(), capability)  # another user's private agent
    sign_in(page, dashboard_url, user, f"#/agents?capability={capability}")
    expect(page.locator("tbody tr")).to_have_count(2)
    expect(page.locator(f'tr[data-agent-id="{hidden["agentId"]}"]')).to_have_count(0)
    their_row = page.locator(f'tr[data-agent-id="{shared["agentId"]}"]')
    expect(their_row.locator("[data-visibility]")).to_have_text("Shared")
    expect(page.locator(f'tr[data-agent-id="{mine["agentId"]}"] [data-visibility]')).to_have_text(
        "Private"
    )
    expect(their_row.get_by_role("button", name=re.compile("Delete"))).to_be_disabled()

    row = page.locator(f'tr[data-agent-id="{mine["agentId"]}"]')
    row.get_by_role("button", name=re.compile("Delete")).click()
    page.get_by_role("dialog").get_by_role("button", name="Cancel").click()
    expect(row).to_be_visible()
    row.get_by_role("button", name=re.compile("Delete")).click()
    page.get_by_role("dialog").get_by_role("button", name="Delete agent").click()
    expect(row).to_have_count(0)
    expect(page.locator("tbody tr")).to_have_count(1)
    assert user.get(f"/agents/{mine['agentUuid']}").status_code == 404


def test_a_confirmation_dialog_closes_when_its_user_signs_out_in_another_tab(
    page: Page, dashboard_url: str, user: Api, api: Api
) -> None:
    agent = register_agent(user, unique("kept"), name="A-private-agent-name")
    deletes: list[str] = []
    page.on("request", lambda r: deletes.append(r.url) if r.method == "DELETE" else None)
    sign_in(page, dashboard_url, user, "#/agents")
    row = page.locator(f'tr[data-agent-id="{agent["agentId"]}"]')
    row.get_by_role("button", name=re.compile("Delete")).click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("A-private-agent-name")

    # The user signs out in another tab, and someone else signs in there: the dialog that
    # named the first user's agent goes with their session, unconfirmed.
    other = page.context.new_page()
    other.goto(dashboard_url + "#/")
    other.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile(r"#/login$"))
    expect(dialog).to_have_count(0)
    someone = api.as_new_user()
    other.get_by_label("Email").fill(str(someone.user and someone.user["email"]))
    other.get_by_label("Password").fill(PASSWORD)
    other.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    expect(dialog).to_have_count(0)
    other.close()
    assert deletes == []
    assert user.get(f"/agents/{agent['agentUuid']}").status_code == 200


def test_runs_are_listed_a_page_at_a_time_and_filtered_by_status(
    page: Page, dashboard_url: str, user: Api, poller: object
) -> None:
    capability = unique("many")
    register_agent(user, capability)
    good = {"name": "batch", "stages": [{"id": "a", "name": "A", "agentCapability": capability}]}
    bad = {
        "name": "orphan",
        "stages": [{"id": "a", "name": "A", "agentCapability": unique("none")}],
    }
    for workflow in [bad] + [good] * 21:
        assert user.post("/workflows/execute", {"workflow": workflow}).status_code == 202

    sign_in(page, dashboard_url, user, "#/workflows")
    expect(page.get_by_test_id("page-info")).to_have_text("Page 1 of 2 · 22 in total")
    expect(page.locator("[data-testid=runs-table] tbody tr")).to_have_count(20)
    page.get_by_role("button", name="Next page").click()
    expect(page).to_have_url(re.compile(r"#/workflows\?page=2$"))
    expect(page.get_by_test_id("page-info")).to_have_text("Page 2 of 2 · 22 in total")
    expect(page.locator("[data-testid=runs-table] tbody tr")).to_have_count(2)

    page.get_by_role("link", name="Failed").click()
    expect(page).to_have_url(re.compile(r"#/workflows\?status=failed$"))
    rows = page.locator("[data-testid=runs-table] tbody tr")
    expect(rows).to_have_count(1, timeout=15_000)
    expect(rows.first).to_have_attribute("data-status", "failed")
    expect(rows.first).to_contain_text("orphan")
    page.get_by_role("link", name="Completed").click()
    expect(page.get_by_test_id("page-info")).to_have_text(
        "Page 1 of 2 · 21 in total", timeout=15_000
    )


def test_pages_say_so_when_the_api_cannot_be_reached(
    page: Page, bucket_for_site: str, user: Api
) -> None:
    from devstack.dashboard import site_urls, upload_site

    dead = f"http://127.0.0.1:{free_port()}"
    upload_site(dead, bucket_for_site)
    url = site_urls(bucket_for_site).primary

    # Signing in with the keyboard alone: the email field has focus, Tab, Enter.
    page.goto(url)
    expect(page.get_by_label("Email")).to_be_focused()
    page.keyboard.type(user.user["email"])
    page.keyboard.press("Tab")
    expect(page.get_by_label("Password")).to_be_focused()
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    expect(page.get_by_role("alert")).to_contain_text(f"Cannot reach the API at {dead}")

    store_session(page, {"refreshToken": "r", "user": user.user})
    page.reload()
    for path, heading in (("#/", "Overview"), ("#/agents", "Agents"), ("#/workflows", "Workflows")):
        page.goto(url + path)
        expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible()
        error = page.locator("[data-state=error]")
        expect(error).to_contain_text("Cannot reach the API")
        expect(error.get_by_role("button", name="Try again")).to_be_visible()


def test_a_workflow_written_in_yaml_runs(
    page: Page, dashboard_url: str, user: Api, poller: object
) -> None:
    capability = unique("yaml")
    register_agent(user, capability)
    sign_in(page, dashboard_url, user, "#/workflows/new")
    page.get_by_label("Workflow definition").fill(
        "name: yaml-pipeline\n"
        "stages:\n"
        f"  - id: first\n    name: First\n    agentCapability: {capability}\n"
        f"  - id: second\n    name: Second\n    agentCapability: {capability}\n"
        "    dependencies: [first]\n"
    )
    page.get_by_label("Input", exact=True).fill("text: hello from YAML\n")
    page.get_by_role("button", name="Validate").click()
    expect(page.get_by_test_id("workflow-messages")).to_contain_text("The definition is valid")
    page.get_by_role("button", name="Run workflow").click()
    expect(page).to_have_url(re.compile(r"#/runs/wfr-[0-9a-f-]+$"))
    expect(page.get_by_test_id("run-status").locator(".badge")).to_have_attribute(
        "data-status", "completed", timeout=20_000
    )
    run = user.get(f"/workflows/{page.url.rsplit('/', 1)[1]}").json()["data"]
    assert run["input"] == {"text": "hello from YAML"}
    screenshot(page, "yaml-run")


def test_the_fortnight_chart_files_runs_by_local_calendar_day_across_a_dst_change(
    browser: Browser, dashboard_url: str
) -> None:
    """Its buckets were 24 h steps back from local midnight: across a daylight-saving change
    (New York, 2026-03-08: 23 hours) every bucket before it began at 23:00 the day before,
    so a run at noon on March 8 was drawn under "Mar 7", and no bar was March 8's."""
    context = browser.new_context(timezone_id="America/New_York")
    try:
        page = context.new_page()
        page.goto(dashboard_url)
        found = page.evaluate(
            """async () => {
              const { bucketRuns } = await import(new URL('js/pages/overview.js', document.baseURI));
              const now = Date.parse('2026-03-10T16:00:00Z');  // noon in New York
              const run = { createdAt: '2026-03-08T17:00:00Z', status: 'completed' };  // noon
              const rows = bucketRuns([run], 'fortnight', now);
              const day = (t) => new Date(t).toLocaleDateString('en-US', { month: 'short', day: 'numeric' });
              return { hit: day(rows.find((r) => r.completed === 1).start), days: rows.map((r) => day(r.start)),
                       midnights: rows.every((r) => new Date(r.start).getHours() === 0) };
            }"""
        )
    finally:
        context.close()
    assert found["hit"] == "Mar 8", found
    assert found["days"][-3:] == ["Mar 8", "Mar 9", "Mar 10"], found
    assert found["midnights"] and len(found["days"]) == 14, found
