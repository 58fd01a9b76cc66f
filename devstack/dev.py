"""`make dev`: the API (`chalice local`) on port 3000 and the SQS poller, each with its log,
then a demo pipeline; Ctrl-C stops what this started."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import IO, Any

from devstack import dashboard
from devstack.stack import PROJECT_DIR, STATE_DIR, port_open

LOG_DIR = STATE_DIR / "logs"
DEMO_EMAIL = "demo@example.com"
DEMO_PASSWORD = "demo-password"  # noqa: S105 (a local demo account)
EXAMPLE_AGENT_PORT = 9001
EXAMPLE_AGENT_TOKEN = "agent-secret-key"  # noqa: S105 (the example agent's, as in the walkthrough)
DEMO_AGENT = {
    "agentId": "example-agent",
    "name": "Example agent (extract, translate, summarize)",
    "description": "examples/agents/server.py, started by make dev",
    "endpoint": f"http://localhost:{EXAMPLE_AGENT_PORT}/agent",
    "authToken": EXAMPLE_AGENT_TOKEN,
    "capabilities": ["text-generation", "extraction", "translation", "summarization"],
}
# What the demo runs on when the SSRF guard refuses the example agent on localhost.
DEMO_MOCK_AGENT = {
    **DEMO_AGENT,
    "agentId": "example-mock-agent",
    "name": "Mock agent (the demo's stand-in for the example agent)",
    "description": "the built-in mock agent",
    "endpoint": "mock://example-agent",
}
ALLOW_PRIVATE = "MAOF_ALLOW_PRIVATE_AGENT_ENDPOINTS"
DEFAULT_PORT = 3000


def _pump(stream: IO[bytes], prefix: str, log_path: Path) -> None:
    """Every line to the log; to the terminal all but the EMF metric lines (a few every
    sweep: they are for CloudWatch, and `maof stats` tells the same story readably)."""
    with open(log_path, "ab") as log:
        for line in iter(stream.readline, b""):
            log.write(line)
            log.flush()
            if line.startswith(b'{"_aws"'):
                continue
            sys.stdout.write(f"{prefix} {line.decode(errors='replace')}")
            sys.stdout.flush()


def start(name: str, args: list[str]) -> subprocess.Popen[bytes]:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [sys.executable, *args],
        cwd=PROJECT_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    threading.Thread(
        target=_pump, args=(process.stdout, f"[{name}]", LOG_DIR / f"{name}.log"), daemon=True
    ).start()
    return process


def call(base: str, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
    request = urllib.request.Request(base + path, method=method)  # noqa: S310 (our own URL)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(request, data, timeout=10) as response:  # noqa: S310
            return json.load(response)
    except urllib.error.HTTPError as exc:
        return json.load(exc)


def wait_healthy(base: str, children: list[subprocess.Popen[bytes]], timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and all(child.poll() is None for child in children):
        try:
            if call(base, "GET", "/health").get("data", {}).get("status") == "ok":
                return True
        except (OSError, ValueError):
            pass
        time.sleep(0.3)
    return False


def _refused_endpoint(answer: dict[str, Any]) -> bool:
    error = answer.get("error") or {}
    return error.get("code") == "VALIDATION_ERROR" and any(
        detail.get("field") == "endpoint" for detail in error.get("details") or []
    )


def register_demo_agent(base: str, token: str) -> str | None:
    """Register the example agent, or, when the SSRF guard refuses it, a mock:// stand-in;
    which one runs the demo ("example" or "mock"), None when the demo cannot run."""
    registered = call(base, "POST", "/agents/register", DEMO_AGENT, token)
    refused = registered.get("success") is False and _refused_endpoint(registered)
    if registered.get("success") is False and not refused:
        if registered["error"]["code"] != "CONFLICT":
            print(f"Demo: could not register the example agent: {registered['error']}", flush=True)
    listed = call(base, "GET", "/agents?limit=100", token=token).get("data") or {}
    earlier = {a["agentId"]: a["agentUuid"] for a in listed.get("agents", [])}
    # Agents from an earlier run in the other mode: probe the example agent now (the guard
    # marks it offline, or its server online), and drop the stand-in when it is not needed,
    # so the demo runs on the agent this mode means.
    if DEMO_AGENT["agentId"] in earlier:
        call(base, "POST", f"/agents/{earlier[DEMO_AGENT['agentId']]}/health-check", token=token)
    if not refused:
        if DEMO_MOCK_AGENT["agentId"] in earlier:
            call(base, "DELETE", f"/agents/{earlier[DEMO_MOCK_AGENT['agentId']]}", token=token)
        return "example"
    print(
        f"Demo: the example agent at {DEMO_AGENT['endpoint']} is refused by the SSRF guard "
        f"({ALLOW_PRIVATE}={os.environ.get(ALLOW_PRIVATE, '')}: private addresses refused, "
        "as in prod); the demo runs with a mock:// agent instead.",
        flush=True,
    )
    mock = call(base, "POST", "/agents/register", DEMO_MOCK_AGENT, token)
    if mock.get("success") is False and mock["error"]["code"] != "CONFLICT":
        print(f"Demo skipped: the mock agent was refused too: {mock['error']}", flush=True)
        return None
    return "mock"


def demo(base: str) -> None:
    """Register a demo user and agents, run the seed README's kind of pipeline, show it."""
    call(
        base,
        "POST",
        "/auth/register",
        {"email": DEMO_EMAIL, "password": DEMO_PASSWORD, "name": "Demo"},
    )
    login = call(base, "POST", "/auth/login", {"email": DEMO_EMAIL, "password": DEMO_PASSWORD})
    if not login.get("success"):
        print(
            f"Demo skipped: could not sign in as {DEMO_EMAIL}: {login.get('error')} "
            "(local data from an older version? `make clean` starts afresh)",
            flush=True,
        )
        return
    token = login["data"]["accessToken"]
    agent = register_demo_agent(base, token)
    if agent is None:
        return
    # The example agent answers {text, ...}; the mock {result, ...}.
    extracted = "${extract.output.text}" if agent == "example" else "${extract.output.result}"
    workflow = {
        "workflow": {
            "name": "demo-extract-translate-summarize",
            "stages": [
                {
                    "id": "extract",
                    "name": "Extract Key Points",
                    "agentCapability": "text-generation",
                },
                {
                    "id": "translate",
                    "name": "Translate to Spanish",
                    "agentCapability": "translation",
                    "dependencies": ["extract"],
                    "input": {"text": extracted, "targetLanguage": "es"},
                },
                {
                    "id": "summarize",
                    "name": "Summarize",
                    "agentCapability": "summarization",
                    "dependencies": ["translate"],
                },
            ],
        },
        "input": {
            "text": "MAOF routes each stage of a pipeline to an agent with the right capability. "
            "The output of each stage is the input of the next. "
            "Every step is in the audit trail."
        },
    }
    run_id = call(base, "POST", "/workflows/execute", workflow, token)["data"]["workflowRunId"]
    deadline = time.monotonic() + 30
    run: dict[str, Any] = {}
    while time.monotonic() < deadline:
        run = call(base, "GET", f"/workflows/{run_id}", token=token)["data"]
        if run["status"] in ("completed", "failed"):
            break
        time.sleep(0.2)
    audit = call(base, "GET", f"/workflows/{run_id}/audit", token=token)["data"]
    print(f"Demo run: {run_id} {run.get('status')}", flush=True)
    for stage in run.get("stages", []):
        print(
            f"  {stage['stageId']:<10} {stage['status']:<10} agent={stage['agentId']}", flush=True
        )
    print(
        f"  audit chain valid={audit['chain']['valid']} head={audit['chain']['head']}", flush=True
    )
    if run.get("status") == "completed":
        result = call(base, "GET", f"/workflows/{run_id}/result", token=token)["data"]["output"]
        print(f"  result: {json.dumps(result, ensure_ascii=False)[:300]}", flush=True)
    else:
        print(f"  error: {run.get('errorMessage')}", flush=True)
    print(f"Demo login: {DEMO_EMAIL} / {DEMO_PASSWORD}", flush=True)


def allow_private_endpoints_by_default(environ: MutableMapping[str, str]) -> None:
    """The example agent listens on localhost, which the SSRF guard refuses: `make dev`
    allows private endpoints unless the environment or `.env` sets a value (empty is unset,
    as everywhere in the settings)."""
    if not environ.get(ALLOW_PRIVATE):
        environ[ALLOW_PRIVATE] = "true"


def port_from_environment(environ: Mapping[str, str]) -> int:
    """MAOF_PORT, or 3000 when it is unset or empty (empty is unset, as everywhere in the
    settings); SystemExit with one line naming MAOF_PORT when it is not a port number."""
    value = environ.get("MAOF_PORT", "").strip()
    if not value:
        return DEFAULT_PORT
    if not (value.isdecimal() and 1 <= int(value) <= 65535):
        raise SystemExit(f"maof: MAOF_PORT must be a port number (1 to 65535), got {value!r}")
    return int(value)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.dev")
    parser.add_argument("--port", type=int, help=f"default: MAOF_PORT, else {DEFAULT_PORT}")
    parser.add_argument("--no-demo", action="store_true")
    args = parser.parse_args()
    if args.port is None:
        args.port = port_from_environment(os.environ)
    base = f"http://127.0.0.1:{args.port}"
    allow_private_endpoints_by_default(os.environ)
    if port_open("127.0.0.1", args.port):
        print(
            f"maof: port {args.port} is already in use; stop that process or set MAOF_PORT",
            file=sys.stderr,
        )
        return 2
    children = [
        start("api", ["-m", "devstack.api", "--port", str(args.port)]),
        start("poller", ["-m", "devstack.poller", "--api-url", base]),
    ]
    if port_open("127.0.0.1", EXAMPLE_AGENT_PORT):
        print(
            f"maof: port {EXAMPLE_AGENT_PORT} is in use; not starting the example agent", flush=True
        )
    else:
        children.append(
            start("agent", ["-m", "examples.agents.server", "--port", str(EXAMPLE_AGENT_PORT)])
        )

    def stop(*_: Any) -> None:
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()

    def on_sigterm(*_: Any) -> None:
        stop()
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    # Ctrl-C stops it even when started in the background (a shell's `&` ignores SIGINT).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if not wait_healthy(base, children):
            print(f"maof: the API did not become healthy; see {LOG_DIR}/api.log", file=sys.stderr)
            stop()
            return 1
        print(f"API: {base}", flush=True)
        try:
            site = dashboard.publish(base)
        except Exception as exc:  # the API and the demo work without the dashboard
            print(f"maof: the dashboard was not uploaded: {exc}", file=sys.stderr, flush=True)
        else:
            print(f"Dashboard: {site.primary}", flush=True)
            print(f"Dashboard (S3 website endpoint): {site.website}", flush=True)
        print(f"Logs: {LOG_DIR}/api.log, {LOG_DIR}/poller.log", flush=True)
        if not args.no_demo:
            demo(base)
        print("Press Ctrl-C to stop.", flush=True)
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        print("maof: a process exited; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop()


if __name__ == "__main__":
    raise SystemExit(main())
