"""Browser fixtures: the dashboard uploaded to the test bucket and served by LocalStack S3,
talking over CORS to the API the integration fixtures serve, in Debian's headless Chromium.

The integration fixtures (the session `stack`, `api_url`, `poller`) are imported, so pytest
makes a second instance of each for this folder; the test database is made once all the
same (`_stack_made` there). Browser tests run last in a session of one process; under
xdist a worker may run them between integration files.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, Playwright, sync_playwright

from tests.integration.conftest import *  # noqa: F403 (stack, api_url, poller, api, user)
from tests.integration.conftest import Api

PROJECT_DIR = Path(__file__).resolve().parents[2]
ARTIFACTS = PROJECT_DIR / "test-artifacts"
DOCS = PROJECT_DIR / "docs"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
# Every page reports what its Content-Security-Policy blocked (Playwright's init scripts and
# evaluate() run outside the page's policy); a test that provokes a violation clears them.
CSP_LISTENER = """
document.addEventListener('securitypolicyviolation', (event) => {
  window.__maofCspViolation({
    directive: event.effectiveDirective,
    blocked: event.blockedURI,
    sample: event.sample,
    page: document.location.href,
  });
});
"""
_CSP_VIOLATIONS: dict[int, list[dict[str, Any]]] = {}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    browser = [item for item in items if here in Path(str(item.path)).parents]
    if browser:
        others = [item for item in items if item not in browser]
        items[:] = others + browser


@pytest.fixture(scope="session")
def dashboard_url(api_url: str) -> str:
    """The site, uploaded to the test bucket with a config.json naming the test API."""
    from devstack.dashboard import site_urls, upload_site

    upload_site(api_url)
    return site_urls().primary


@pytest.fixture
def bucket_for_site(stack: None) -> Iterator[str]:
    """A scratch bucket to publish a differently configured copy of the site to."""
    from chalicelib.aws import aws_client

    name = f"maof-test-site-{uuid.uuid4().hex[:8]}"
    s3 = aws_client("s3")
    s3.create_bucket(Bucket=name)
    yield name
    for item in s3.list_objects_v2(Bucket=name).get("Contents", []):
        s3.delete_object(Bucket=name, Key=item["Key"])
    s3.delete_bucket(Bucket=name)


@pytest.fixture(scope="session")
def playwright_driver() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="session")
def browser(playwright_driver: Playwright) -> Iterator[Browser]:
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make browser-deps` installs Debian's chromium")
    launched = playwright_driver.chromium.launch(
        executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
    )
    yield launched
    launched.close()


def _page(
    browser: Browser, request: pytest.FixtureRequest, viewport: dict[str, int]
) -> Iterator[Page]:
    context = browser.new_context(viewport=viewport)  # type: ignore[arg-type]
    context.set_default_timeout(10_000)
    violations: list[dict[str, Any]] = []
    context.expose_binding("__maofCspViolation", lambda source, found: violations.append(found))
    context.add_init_script(CSP_LISTENER)
    page = context.new_page()
    _CSP_VIOLATIONS[id(page)] = violations
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    blocked = list(violations)
    save_screenshot(page, ARTIFACTS / f"{request.node.name}.png")
    context.close()
    del _CSP_VIOLATIONS[id(page)]
    assert not errors, f"JavaScript errors on the page: {errors}"
    assert not blocked, f"Content-Security-Policy violations: {blocked}"


def csp_violations(page: Page) -> list[dict[str, Any]]:
    """What the Content-Security-Policy blocked so far in `page`'s browser context."""
    return _CSP_VIOLATIONS[id(page)]


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh browser tab at 1280 px; its final state is saved as test-artifacts/<test>.png."""
    yield from _page(browser, request, DESKTOP)


@pytest.fixture
def phone_page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    """The same at phone width."""
    yield from _page(browser, request, PHONE)


def save_screenshot(page: Page, path: Path) -> None:
    """The whole page from the top, without the passing toasts. (They are hidden through the
    CSSOM: the site's policy refuses the <style> element Playwright's `style=` would add.)"""
    path.parent.mkdir(exist_ok=True)
    toasts = "document.querySelectorAll('.toasts').forEach((el) => { el.style.display = %s; })"
    page.evaluate("window.scrollTo(0, 0)")
    page.evaluate(toasts % "'none'")
    page.screenshot(path=str(path), full_page=True)
    page.evaluate(toasts % "''")


def screenshot(page: Page, name: str, *, docs: bool = False) -> None:
    """Save a named screenshot; `docs` ones also refresh docs/ when MAOF_UPDATE_DOCS=1."""
    path = ARTIFACTS / f"{name}.png"
    save_screenshot(page, path)
    if docs and os.environ.get("MAOF_UPDATE_DOCS") == "1":
        DOCS.mkdir(exist_ok=True)
        shutil.copyfile(path, DOCS / f"{name}.png")


# The dashboard's session store (dashboard/js/api.js): IndexedDB `maof`, store `session`.
_SESSION_STORE = """
({ write, value }) => new Promise((resolve, reject) => {
  const opening = indexedDB.open('maof', 1);
  opening.onupgradeneeded = () => opening.result.createObjectStore('session');
  opening.onerror = () => reject(opening.error);
  opening.onsuccess = () => {
    const transaction = opening.result.transaction('session', write ? 'readwrite' : 'readonly');
    const store = transaction.objectStore('session');
    const request = !write ? store.get('current')
      : value === null ? store.delete('current') : store.put(value, 'current');
    transaction.oncomplete = () => { opening.result.close(); resolve(request.result ?? null); };
    transaction.onerror = () => reject(transaction.error);
  };
})
"""


def stored_session(page: Page) -> dict[str, Any] | None:
    """The session the dashboard keeps for the page's origin (`{refreshToken, user}`)."""
    found = page.evaluate(_SESSION_STORE, {"write": False, "value": None})
    return dict(found) if found else None


def store_session(page: Page, value: dict[str, Any] | None) -> None:
    """Replace it (None: signed out); the page reads it when it next loads."""
    page.evaluate(_SESSION_STORE, {"write": True, "value": value})


def sign_in(page: Page, dashboard_url: str, client: Api, hash_path: str = "#/") -> None:
    """Open the dashboard already signed in as `client`'s user: a fresh login's refresh token
    stored as the dashboard stores it (the page gets its access token by refreshing)."""
    login = client.post(
        "/auth/login", {"email": client.user["email"], "password": "correct-horse-battery"}
    )
    assert login.status_code == 200, login.text
    data = login.json()["data"]
    page.goto(dashboard_url + "#/login")
    # Once the page has read the (empty) store: it must not start a refresh with this token
    # that the navigation below would cut off.
    page.get_by_role("heading", name="Sign in").wait_for()
    store_session(page, {"refreshToken": data["refreshToken"], "user": data["user"]})
    page.goto("about:blank")
    page.goto(dashboard_url + hash_path)


class AgentServer:
    """A minimal agent speaking MAOF's agent protocol: healthy, answers every task, after
    `delayMs` milliseconds when its input asks for that (at most 5 s)."""

    def __init__(self) -> None:
        self.calls = 0
        handler = self._handler()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/agent"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._send({"status": "healthy"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                task = json.loads(self.rfile.read(length) or b"{}")
                owner.calls += 1
                stage_input = task.get("input")
                if isinstance(stage_input, dict) and isinstance(stage_input.get("delayMs"), int):
                    time.sleep(min(stage_input["delayMs"], 5000) / 1000)
                capability = task.get("capability", "")
                output = {"result": f"{capability} result", "received": task.get("input")}
                self._send({"status": "success", "output": output})

        return Handler

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="session")
def agent_server() -> Iterator[AgentServer]:
    server = AgentServer()
    yield server
    server.stop()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
