"""The dashboard's defences in a real browser: API data rendered as text, a
Content-Security-Policy that blocks inline script by itself, the access token kept out of
storage, refresh tokens rotated one tab at a time, and a draft no other user sees."""

from __future__ import annotations

import base64
import json
import re
import time
from typing import Any

from playwright.sync_api import Page, Request, expect

from tests.browser.conftest import (
    csp_violations,
    sign_in,
    store_session,
    stored_session,
    unique,
)
from tests.integration.conftest import Api, register_agent, wait_for_run

PASSWORD = "correct-horse-battery"
PAYLOAD = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'


def claims(token: str) -> dict[str, Any]:
    """A JWT's claims (unverified: only to tell an access token from a refresh token)."""
    body = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))))


def wait_for_violation(page: Page, directive: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = [v for v in csp_violations(page) if v["directive"] == directive]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no {directive} violation: {csp_violations(page)}"
        page.wait_for_timeout(50)


def test_an_agents_markup_is_shown_as_text_and_the_policy_blocks_inline_script(
    page: Page, dashboard_url: str, api_url: str, user: Api, poller: object
) -> None:
    # The mock agent's output echoes its input: the payload comes back from the API as data.
    capability = unique("echo")
    register_agent(user, capability)
    stages = [{"id": "echo", "name": "Echo", "agentCapability": capability}]
    accepted = user.post(
        "/workflows/execute",
        {"workflow": {"name": "markup-probe", "stages": stages}, "input": {"text": PAYLOAD}},
    )
    assert accepted.status_code == 202, accepted.text
    run_id = accepted.json()["data"]["workflowRunId"]
    run = wait_for_run(user, run_id)
    assert run["stages"][0]["output"]["received"] == {"text": PAYLOAD}

    sign_in(page, dashboard_url, user, f"#/runs/{run_id}")
    expect(page.get_by_test_id("run-status").locator(".badge")).to_have_attribute(
        "data-status", "completed"
    )
    panel = page.get_by_test_id("stage-panel")
    panel.get_by_role("tab", name="Output").click()
    output = panel.get_by_role("tabpanel")
    expect(output).to_contain_text("<img src=x onerror=")
    expect(output).to_contain_text("<script>window.__pwned=2</script>")
    expect(page.get_by_test_id("run-result")).to_contain_text("<script>window.__pwned=2</script>")
    assert page.locator('img[src="x"]').count() == 0  # text nodes, never elements
    assert page.evaluate("window.__pwned") is None
    assert csp_violations(page) == []  # the dashboard itself needs nothing the policy refuses

    # Were markup ever inserted, the policy itself would refuse to run its inline handler
    # (the image fails to load, so the handler would run at once)…
    page.evaluate(
        """() => document.body.insertAdjacentHTML(
            'beforeend', '<img src="x" onerror="window.__pwned = 3">')"""
    )
    handler = wait_for_violation(page, "script-src-attr")
    assert handler["blocked"] == "inline"
    # …or an inline script element. (eval, also refused, cannot be shown from here: code
    # that Playwright evaluates is exempt from the page's policy.)
    page.evaluate(
        """() => {
            const script = document.createElement('script');
            script.textContent = 'window.__pwned = 4';
            document.body.append(script);
        }"""
    )
    inline = wait_for_violation(page, "script-src-elem")
    assert inline["blocked"] == "inline"
    assert page.evaluate("window.__pwned") is None

    # Once config.json is read, the page may connect to its own origin and that API only,
    # though index.html's policy admits any loopback port.
    other = re.sub(r":\d+$", ":9", api_url)
    page.evaluate("url => fetch(url).catch(() => null)", f"{other}/health")
    blocked = wait_for_violation(page, "connect-src")
    assert blocked["blocked"].startswith(other)
    csp_violations(page).clear()  # provoked on purpose


def test_the_access_token_stays_in_memory_a_reload_keeps_the_session_and_sign_out_ends_it(
    page: Page, dashboard_url: str, api_url: str, user: Api
) -> None:
    bearers: list[str] = []
    page.on(
        "request",
        lambda request: (
            bearers.append(request.headers["authorization"].split(" ", 1)[1])
            if "authorization" in request.headers
            else None
        ),
    )
    page.goto(dashboard_url + "#/login")
    page.get_by_label("Email").fill(str(user.user and user.user["email"]))
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    expect(page.locator("[data-state=loading]")).to_have_count(0)

    # The API was called with an access token that no storage holds: the session store has
    # the refresh token and the user, localStorage and sessionStorage no token at all.
    assert bearers and all(claims(token)["type"] == "access" for token in bearers)
    storage = page.evaluate("JSON.stringify([{...localStorage}, {...sessionStorage}])")
    assert "eyJ" not in storage  # no JWT
    stored = stored_session(page)
    assert stored is not None and set(stored) == {"refreshToken", "user"}
    assert not set(bearers) & set(json.dumps(stored).split('"'))
    assert claims(stored["refreshToken"])["type"] == "refresh"

    # A reload keeps the user signed in: the new page refreshes for its access token, and
    # stores the refresh token the answer carries.
    with page.expect_request(f"{api_url}/auth/refresh") as refresh:
        page.reload()
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    expect(page.get_by_test_id("user-name")).to_have_text(str(user.user and user.user["name"]))
    assert json.loads(refresh.value.post_data or "{}") == {"refreshToken": stored["refreshToken"]}
    rotated = stored_session(page)
    assert rotated is not None and rotated["refreshToken"] != stored["refreshToken"]

    # Sign out revokes the refresh token at the API and forgets it here. (Until the API has
    # /auth/logout the call fails, and signing out works all the same.)
    with page.expect_request(f"{api_url}/auth/logout") as logout:
        page.get_by_role("button", name="Sign out").click()
    assert logout.value.method == "POST"
    assert json.loads(logout.value.post_data or "{}") == {"refreshToken": rotated["refreshToken"]}
    expect(page).to_have_url(re.compile(r"#/login$"))
    expect(page.get_by_test_id("flash")).to_contain_text("signed out")
    assert stored_session(page) is None
    page.reload()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.goto(dashboard_url + "#/agents")
    expect(page).to_have_url(re.compile(r"#/login$"))


def test_the_sign_in_form_after_a_sign_out_or_an_expiry_does_not_show_the_last_users_email(
    page: Page, dashboard_url: str, user: Api
) -> None:
    email = str(user.user and user.user["email"])

    def sign_in_with_the_form() -> None:
        page.get_by_label("Email").fill(email)
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("heading", name="Overview")).to_be_visible()

    page.goto(dashboard_url + "#/login")
    sign_in_with_the_form()
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_test_id("flash")).to_contain_text("signed out")
    expect(page.get_by_label("Email")).to_have_value("")

    sign_in_with_the_form()
    stored = stored_session(page)
    assert stored is not None
    store_session(page, {**stored, "refreshToken": "expired.refresh.token"})
    page.reload()  # the refresh is refused: the session has expired
    expect(page.get_by_test_id("flash")).to_contain_text("Your session has expired")
    expect(page.get_by_label("Email")).to_have_value("")


def test_tabs_refresh_one_at_a_time_never_reuse_a_token_and_sign_out_together(
    page: Page, dashboard_url: str, api_url: str, user: Api
) -> None:
    presented: list[str] = []

    def on_request(request: Request) -> None:
        if request.url == f"{api_url}/auth/refresh" and request.method == "POST":
            presented.append(json.loads(request.post_data or "{}")["refreshToken"])

    context = page.context
    context.on("request", on_request)
    sign_in(page, dashboard_url, user, "#/")
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    tabs = [page] + [context.new_page() for _ in range(2)]
    for tab in tabs[1:]:
        tab.goto(dashboard_url + "#/agents")
        expect(tab.get_by_role("heading", name="Agents", exact=True)).to_be_visible()

    # Every tab reloads at once: each needs a new access token, so each refreshes. Without
    # the lock they would all present the token stored now; with rotation and reuse
    # detection that would revoke the session in every tab.
    before = len(presented)
    for tab in tabs:
        tab.evaluate("window.__beforeReload = true; setTimeout(() => location.reload(), 0)")
    for tab in tabs:
        tab.wait_for_function("window.__beforeReload === undefined")
        expect(tab.get_by_test_id("user-name")).to_be_visible()
        expect(tab.locator("[data-state=loading]")).to_have_count(0)
        expect(tab.locator("[data-state=error]")).to_have_count(0)
    assert len(presented) == before + len(tabs)
    assert len(set(presented)) == len(presented), "a rotated refresh token was presented again"
    stored = [stored_session(tab) for tab in tabs]
    assert stored[0] is not None and stored[0] == stored[1] == stored[2]
    assert stored[0]["refreshToken"] not in presented  # the newest, not yet used

    # Signing out in one tab signs out the others.
    page.get_by_role("button", name="Sign out").click()
    for tab in tabs:
        expect(tab).to_have_url(re.compile(r"#/login$"))
    assert stored_session(tabs[1]) is None


def test_a_draft_is_its_users_alone_and_signing_out_forgets_it(
    page: Page, dashboard_url: str, user: Api, api: Api
) -> None:
    """The New workflow page keeps a draft (definition and input) across reloads: the next
    person signing in on the same browser must not find the last one's input there."""
    secret = "A's private document"
    holds_secret = "(s) => Object.values(localStorage).some((v) => v.includes(s))"
    # A draft saved before drafts had owners may be anyone's: it is not shown, and goes.
    page.goto(dashboard_url + "#/login")
    page.get_by_role("heading", name="Sign in").wait_for()
    legacy = json.dumps({"definition": "{}", "input": json.dumps({"text": "legacy " + secret})})
    page.evaluate("(draft) => localStorage.setItem('maof.draft', draft)", legacy)
    sign_in(page, dashboard_url, user, "#/workflows/new")
    expect(page.get_by_role("heading", name="New workflow")).to_be_visible()
    editor = page.get_by_label("Input", exact=True)
    expect(editor).to_have_value(re.compile(r"\S"))  # the page has filled it
    expect(editor).not_to_have_value(re.compile("legacy"))
    assert page.evaluate("localStorage.getItem('maof.draft')") is None

    editor.fill(json.dumps({"text": secret}))
    page.wait_for_function(holds_secret, arg=secret)
    page.reload()  # the same user finds their draft again
    expect(editor).to_have_value(re.compile(secret))

    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile(r"#/login$"))
    assert not page.evaluate(holds_secret, secret), "signing out forgets the draft"

    # Another user on the same browser starts from the template, whichever way A left (a
    # session that expires, unlike signing out, leaves A's draft for A's return).
    left = json.dumps({"definition": "{}", "input": json.dumps({"text": secret})})
    key = f"maof.draft.{user.user and user.user['userUuid']}"
    page.evaluate("([key, draft]) => localStorage.setItem(key, draft)", [key, left])
    other = api.as_new_user()
    sign_in(page, dashboard_url, other, "#/workflows/new")
    expect(page.get_by_role("heading", name="New workflow")).to_be_visible()
    expect(editor).to_have_value(re.compile(r"\S"))
    expect(editor).not_to_have_value(re.compile(secret))
