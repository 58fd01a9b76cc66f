"""The SSRF guard over real HTTP: with private addresses refused, unsafe agent endpoints are a
400 at registration and a failed stage at call time, and nothing reaches a listener on
loopback; a call is pinned to the address that was checked (one lookup, the name in `Host`,
SNI and the certificate check); redirects are never followed; `make dev`'s demo survives
the guard."""

from __future__ import annotations

import datetime
import os
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import urllib3
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import update

from chalicelib.agents import network
from chalicelib.agents.candidates import invalidate, invalidate_capability
from chalicelib.agents.dispatch import AgentCallFailed, AgentTask, call_agent
from chalicelib.agents.health import probe
from chalicelib.config import get_settings, reset_settings
from chalicelib.db import session_scope
from chalicelib.db.models import Agent
from devstack import dev
from tests.integration.conftest import (
    Api,
    register_agent,
    unique_capability,
    wait_for_run,
    wait_until,
)
from tests.support.agents import ScriptedAgent, ok, redirect
from tests.support.dns import FakeResolver

# Each of these would reach loopback, a private network or the metadata service; `{port}`
# is the loopback listener's, so a request that got through would be recorded.
REFUSED = [
    "http://127.0.0.1:{port}\\@8.8.8.8/",
    "http://[::ffff:127.0.0.1]:{port}/agent",
    "http://2130706433:{port}/agent",
    "http://0x7f.1:{port}/agent",
    "http://127.1:{port}/agent",
    "http://169.254.169.254/latest/meta-data/",
    "http://100.64.0.1/agent",
    "http://[2002:7f00:1::]:{port}/agent",
    "http://user:pass@example.com/",
    "http://user:pass@127.0.0.1:{port}/agent",
    "http://127.0.0.1:{port}/agent",
    "http://localhost:{port}/agent",
    "http://rebind.test:{port}/agent",  # answers a public address first, loopback second
]
# Nothing the caller is told may name an address the endpoint or its name points at.
ADDRESSES = ["127.0.0.1", "8.8.8.8", "169.254", "100.64", "2002:", "93.184", "::ffff", "user:pass"]
TASK = AgentTask("wfr-guard", "s0", 1, "summarization", {"text": "hi"}, "guard")


@pytest.fixture
def guard_on(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Private addresses refused, as in prod (the suite allows them for its loopback agents)."""
    monkeypatch.setenv("MAOF_ALLOW_PRIVATE_AGENT_ENDPOINTS", "false")
    reset_settings()
    yield
    reset_settings()


@pytest.fixture
def loopback() -> Iterator[ScriptedAgent]:
    """A listener on 127.0.0.1 that records every request reaching it."""
    agent = ScriptedAgent().start()
    yield agent
    agent.stop()


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> FakeResolver:
    fake = FakeResolver(
        {
            "agent.test": ["127.0.0.1"],
            "other.test": ["127.0.0.1"],
            "rebind.test": ["93.184.216.34", "127.0.0.1"],
            "oci.test": ["192.0.0.192"],
            "example.com": ["93.184.216.34"],
            "localhost": ["127.0.0.1", "::1"],
        }
    )
    monkeypatch.setattr(network, "resolve_host", fake)
    return fake


def port_of(agent: ScriptedAgent) -> int:
    assert agent.server is not None
    return int(agent.server.server_address[1])


def said(response_or_text: Any) -> str:
    """What the caller is told: the error's message and details."""
    error = response_or_text.json()["error"]
    return f"{error['message']} {error.get('details')}"


@pytest.mark.parametrize("endpoint", REFUSED)
def test_with_the_guard_on_registration_refuses_the_endpoint_with_a_400_naming_it(
    user: Api, guard_on: None, resolver: FakeResolver, loopback: ScriptedAgent, endpoint: str
) -> None:
    response = user.post(
        "/agents/register",
        {
            "agentId": f"agent-{uuid.uuid4().hex[:10]}",
            "name": "Unsafe",
            "endpoint": endpoint.format(port=port_of(loopback)),
            "authToken": "t",
            "capabilities": [unique_capability("ssrf")],
        },
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    assert [d["field"] for d in error["details"]] == ["endpoint"]
    assert "not allowed" in error["details"][0]["message"]
    assert not [a for a in ADDRESSES if a in said(response)]
    assert loopback.seen == []


@pytest.mark.parametrize("endpoint", REFUSED)
def test_with_the_guard_on_a_call_or_probe_to_the_endpoint_is_refused_before_connecting(
    guard_on: None, resolver: FakeResolver, loopback: ScriptedAgent, endpoint: str
) -> None:
    url = endpoint.format(port=port_of(loopback))
    with pytest.raises(AgentCallFailed) as failed:
        call_agent(url, "token", "agent-1", TASK)
    assert (failed.value.code, failed.value.retryable) == ("ENDPOINT_NOT_ALLOWED", False)
    assert not [a for a in ADDRESSES if a in str(failed.value)]
    assert probe(url) == "offline"
    assert loopback.seen == []


@pytest.fixture
def no_connections(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every connection the guard lets through is recorded, never made (something may
    answer at a special-purpose address on this network)."""
    attempted: list[Any] = []

    def recorded(target: Any) -> Any:
        attempted.append(target)
        raise OSError("connection suppressed by the test")

    monkeypatch.setattr(network, "pool_for", recorded)
    return attempted


# 192.0.0.0/24 is not globally reachable (192.0.0.192: Oracle Cloud classic metadata), though
# ipaddress.is_global says otherwise in the Python 3.11 releases before 3.11.10.
SPECIAL_PURPOSE = [
    "http://192.0.0.192:9/opc/v1/instance/",
    "http://[::ffff:192.0.0.192]:9/agent",
    "http://[64:ff9b::c000:c0]:9/agent",
    "http://oci.test:9/agent",
    "http://[fec0::1]:9/agent",
]


@pytest.mark.parametrize("endpoint", SPECIAL_PURPOSE)
def test_with_the_guard_on_registration_refuses_a_special_purpose_endpoint(
    user: Api,
    guard_on: None,
    resolver: FakeResolver,
    no_connections: list[Any],
    endpoint: str,
) -> None:
    response = register(user, endpoint, unique_capability("ssrf"))
    assert response.status_code == 400, response.text
    assert [d["field"] for d in response.json()["error"]["details"]] == ["endpoint"]
    assert "192.0.0" not in said(response)
    assert no_connections == []


@pytest.mark.parametrize("url", ["http://192.0.0.192/hook", "http://oci.test/hook"])
def test_with_the_guard_on_a_special_purpose_callback_url_is_400(
    user: Api,
    guard_on: None,
    resolver: FakeResolver,
    no_connections: list[Any],
    url: str,
) -> None:
    stage = {"id": "s0", "name": "Only", "agentCapability": unique_capability("cb")}
    response = user.post(
        "/workflows/execute",
        {
            "workflow": {"name": "guard", "stages": [stage]},
            "input": {"text": "hi"},
            "callback": {"url": url, "secret": "s" * 32},
        },
    )
    assert response.status_code == 400, response.text
    assert [d["field"] for d in response.json()["error"]["details"]] == ["callback.url"]
    assert no_connections == []


def test_an_agent_whose_endpoint_the_guard_now_refuses_fails_its_stage_and_is_never_called(
    user: Api, poller: Any, loopback: ScriptedAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    capability = unique_capability("guarded")
    registered = register_agent(user, capability, endpoint=loopback.url)  # private allowed
    probes = len(loopback.seen)
    monkeypatch.setenv("MAOF_ALLOW_PRIVATE_AGENT_ENDPOINTS", "false")
    reset_settings()
    try:
        run = wait_for_run(user, submit(user, capability))
    finally:
        reset_settings()
    assert run["status"] == "failed"
    assert "ENDPOINT_NOT_ALLOWED" in run["errorMessage"]
    assert registered["agentId"] in run["errorMessage"]
    assert "127.0.0.1" not in run["errorMessage"]
    assert len(loopback.seen) == probes and loopback.calls == []


def test_shape_checks_hold_even_when_private_endpoints_are_allowed(
    user: Api, poller: Any, loopback: ScriptedAgent
) -> None:
    # The parser differential: urlparse reads host 8.8.8.8, urllib3 connected to 127.0.0.1.
    capability = unique_capability("differential")
    registered = register_agent(user, capability)
    with session_scope() as session:
        session.execute(
            update(Agent)
            .where(Agent.agent_id == registered["agentId"])
            .values(endpoint=f"http://127.0.0.1:{port_of(loopback)}\\@8.8.8.8/agent")
        )
    invalidate_capability(capability)
    run = wait_for_run(user, submit(user, capability))
    assert run["status"] == "failed"
    assert "ENDPOINT_NOT_ALLOWED" in run["errorMessage"]
    assert loopback.seen == []


def test_a_redirect_to_loopback_is_not_followed_and_fails_the_stage(
    user: Api, poller: Any, loopback: ScriptedAgent
) -> None:
    # Private endpoints are allowed (the suite's default), so the first hop is reachable;
    # the point is that the second one is never tried.
    redirecting = ScriptedAgent(default=redirect(f"http://127.0.0.1:{port_of(loopback)}/agent"))
    redirecting.start()
    try:
        capability = unique_capability("redirect")
        registered = register_agent(user, capability, endpoint=redirecting.url)
        run = wait_for_run(user, submit(user, capability, {"retries": 2, "backoffMs": 0}))
    finally:
        redirecting.stop()
    assert run["status"] == "failed"
    assert "REDIRECT_REFUSED" in run["errorMessage"]
    assert registered["agentId"] in run["errorMessage"]
    assert len(redirecting.calls) == 1  # a redirect is final: no retry either
    assert loopback.seen == []


def test_a_call_is_pinned_to_the_one_lookup_and_sends_the_name_as_host(
    loopback: ScriptedAgent, resolver: FakeResolver
) -> None:
    loopback.default = ok({"pinned": True})
    url = f"http://agent.test:{port_of(loopback)}/agent"
    assert call_agent(url, "token", "agent-1", TASK).value == {"pinned": True}
    assert resolver.asked == ["agent.test"]
    [call] = loopback.calls
    assert call.headers["Host"] == f"agent.test:{port_of(loopback)}"
    assert probe(url) == "online"
    assert resolver.asked == ["agent.test", "agent.test"]
    assert loopback.seen[-1].headers["Host"] == f"agent.test:{port_of(loopback)}"


def test_a_registered_agent_on_a_name_is_called_at_the_checked_address(
    user: Api, poller: Any, loopback: ScriptedAgent, resolver: FakeResolver
) -> None:
    capability = unique_capability("named")
    url = f"http://agent.test:{port_of(loopback)}/agent"
    assert register_agent(user, capability, endpoint=url)["status"] == "online"
    run = wait_for_run(user, submit(user, capability))
    assert run["status"] == "completed", run
    [call] = loopback.calls
    assert call.headers["Host"] == f"agent.test:{port_of(loopback)}"


def submit(client: Api, capability: str, config: dict[str, Any] | None = None) -> str:
    stage = {"id": "s0", "name": "Only", "agentCapability": capability}
    response = client.post(
        "/workflows/execute",
        {
            "workflow": {
                "name": "guard",
                "stages": [{**stage, **({"config": config} if config else {})}],
            },
            "input": {"text": "hi"},
        },
    )
    assert response.status_code == 202, response.text
    return str(response.json()["data"]["workflowRunId"])


# ------------------------------------------------------------------ HTTPS: SNI and the name


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA (its PEM file) and a certificate it signed for agent.test only."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "MAOF test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent.test")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("agent.test")]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = (directory / n for n in ("ca.pem", "cert.pem", "key.pem"))
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_file, cert_file, key_file


@pytest.fixture
def tls_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """An HTTPS server on 127.0.0.1 with a certificate for agent.test, trusted through
    SSL_CERT_FILE (the default trust store urllib3 loads); it records SNI and Host."""
    ca_file, cert_file, key_file = _certificates(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    seen: dict[str, Any] = {"sni": [], "host": []}
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    context.sni_callback = lambda sock, name, ctx: seen["sni"].append(name)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            seen["host"].append(self.headers["Host"])
            body = b'{"status": "healthy"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    seen["port"] = server.server_address[1]
    yield seen
    server.shutdown()
    server.server_close()


def test_https_connects_to_the_checked_address_with_the_name_for_sni_and_the_certificate(
    tls_agent: dict[str, Any], resolver: FakeResolver
) -> None:
    url = f"https://agent.test:{tls_agent['port']}/agent"
    response = network.pinned_request("GET", url, timeout=urllib3.Timeout(5))
    response.read()
    response.release_conn()
    assert response.status == 200
    assert tls_agent["sni"] == ["agent.test"]
    assert tls_agent["host"] == [f"agent.test:{tls_agent['port']}"]
    assert resolver.asked == ["agent.test"]


def test_https_refuses_a_certificate_for_another_name_at_the_same_address(
    tls_agent: dict[str, Any], resolver: FakeResolver
) -> None:
    url = f"https://other.test:{tls_agent['port']}/agent"
    with pytest.raises(urllib3.exceptions.SSLError):
        network.pinned_request("GET", url, timeout=urllib3.Timeout(5))
    assert probe(url) == "offline"
    assert tls_agent["host"] == []


# ------------------------------------------------------------------ mock:// and make dev


@pytest.fixture
def prod(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process (the API server included) as the prod stage, on the test stack."""
    settings = get_settings()
    monkeypatch.setenv("MAOF_STAGE", "prod")
    monkeypatch.setenv("MAOF_JWT_SECRET", "p" * 40)
    monkeypatch.setenv("MAOF_SECRET_KEY", "k" * 40)  # prod refuses the test stage's dev key
    monkeypatch.setenv("MAOF_AWS_ENDPOINT_URL", settings.aws_endpoint_url or "")
    monkeypatch.setenv("MAOF_ALLOW_INSECURE_CONNECTIONS", "true")  # the test stack's URLs
    monkeypatch.delenv("MAOF_MOCK_AGENTS", raising=False)
    reset_settings()
    yield
    reset_settings()


def register(user: Api, endpoint: str, capability: str) -> Any:
    """POST /agents/register for one capability (its answer, whatever it is)."""
    body = {
        "agentId": f"agent-{uuid.uuid4().hex[:10]}",
        "name": "Guarded",
        "endpoint": endpoint,
        "authToken": "t",
        "capabilities": [capability],
    }
    return user.post("/agents/register", body)


def test_in_prod_registering_a_mock_endpoint_is_a_400_naming_endpoint(api: Api, prod: None) -> None:
    response = register(api.as_new_user(), "mock://summarizer", "summarization")
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert [d["field"] for d in error["details"]] == ["endpoint"]
    assert "MAOF_MOCK_AGENTS" in error["details"][0]["message"]


def test_make_dev_demo_with_the_guard_on_says_so_and_runs_on_a_mock_agent(
    api_url: str, poller: Any, guard_on: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # Other tests' agents with the demo's capabilities (a fresh `make dev` has none) would
    # compete for its stages: take them out of routing.
    capabilities = dev.DEMO_AGENT["capabilities"]
    with session_scope() as session:
        session.execute(
            update(Agent)
            .where(Agent.capabilities.overlap(capabilities), Agent.deleted_at.is_(None))
            .values(status="offline")
        )
    invalidate(capabilities)
    dev.demo(api_url)
    out = capsys.readouterr().out
    assert "is refused by the SSRF guard" in out
    assert "runs with a mock:// agent instead" in out
    assert "completed" in out.split("Demo run:")[1].splitlines()[0]
    assert "agent=example-mock-agent" in out


@pytest.fixture
def hanging_names(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A name server that never answers for names starting with "hang" (until the test
    ends); every other name is 127.0.0.1."""
    released = threading.Event()

    def resolver(hostname: str, port: int) -> list[str]:
        if hostname.startswith("hang"):
            released.wait(30)
            return []
        return ["127.0.0.1"]

    monkeypatch.setattr(network, "resolve_host", resolver)
    yield
    released.set()
    wait_until(lambda: not network._lookups, timeout=5)  # no hung lookup for the next test to join


def test_a_name_that_never_resolves_is_refused_in_time_at_registration(
    user: Api, hanging_names: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name server that never answers (a hostile one, for the URL's domain): registering
    the agent, or submitting a callback to it, is a 400 within the lookup's bound, not a
    request held for as long as the system resolver keeps trying."""
    monkeypatch.setattr(network, "CHECK_LOOKUP_SECONDS", 0.5)
    started = time.monotonic()
    response = register(user, "http://hang.test/agent", "hang")
    assert time.monotonic() - started < 3
    assert response.status_code == 400, response.text
    assert "did not resolve in time" in response.text


def test_hanging_lookups_of_one_tenant_leave_lookups_for_the_others(hanging_names: None) -> None:
    """A batch's worth of calls to agents whose name server never answers: each gives up at
    its deadline, but its lookup thread stays busy until the system resolver gives up; an
    honest agent's lookup in the same process must still get a thread and resolve."""
    for index in range(16):
        with pytest.raises(TimeoutError):
            network.resolve_and_check(f"http://hang{index}.test/agent", time.monotonic() + 0.05)
    target = network.resolve_and_check("http://agent.test/agent", time.monotonic() + 2)
    assert target.address == "127.0.0.1"


def test_lookups_of_a_name_already_hanging_wait_on_that_lookup_and_take_no_thread(
    hanging_names: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More agents on one hung name than there are lookup threads (or one agent probed
    again and again): each lookup held a thread of its own, and together they took them
    all. A lookup of a name in flight now waits on that one: one thread per name."""
    asked: list[str] = []
    hanging = network.resolve_host

    def counted(hostname: str, port: int) -> list[str]:
        asked.append(hostname)
        return hanging(hostname, port)

    monkeypatch.setattr(network, "resolve_host", counted)
    for _ in range(network.LOOKUP_THREADS + 8):
        with pytest.raises(TimeoutError) as caught:
            network.resolve_and_check("http://hang.test/agent", time.monotonic() + 0.05)
        assert not isinstance(caught.value, network.ResolverBusy)
    assert asked == ["hang.test"]
    target = network.resolve_and_check("http://agent.test/agent", time.monotonic() + 2)
    assert target.address == "127.0.0.1"


def test_a_lookup_no_thread_comes_free_for_by_its_deadline_is_busy_not_timed_out(
    hanging_names: None,
) -> None:
    """Distinct hung names holding every lookup thread: the next lookup never begins. That
    says nothing of its name (ResolverBusy, which a health check does not record), where
    a lookup that began and did not finish is a TimeoutError of its own."""
    for index in range(network.LOOKUP_THREADS):
        with pytest.raises(TimeoutError):
            network.resolve_and_check(f"http://hang{index}.test/agent", time.monotonic() + 0.05)
    started = time.monotonic()
    with pytest.raises(network.ResolverBusy):
        network.resolve_and_check("http://agent.test/agent", started + 0.3)
    assert time.monotonic() - started < 1


def _every_lookup_thread_held() -> None:
    """Distinct hung names (another tenant's agents) holding every lookup thread."""
    for index in range(network.LOOKUP_THREADS):
        with pytest.raises(TimeoutError):
            network.resolve_and_check(
                f"http://hang{uuid.uuid4().hex[:6]}{index}.test/agent", time.monotonic() + 0.05
            )


def test_no_lookup_free_at_registration_is_a_503_not_a_verdict_on_the_endpoint(
    user: Api, hanging_names: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every lookup thread held by another tenant's hung names: registering an agent whose
    name resolves at once was refused 400 ("did not resolve in time"), blaming the
    endpoint for this service's want of a thread. A 503: try again."""
    monkeypatch.setattr(network, "CHECK_LOOKUP_SECONDS", 0.3)
    _every_lookup_thread_held()
    response = register(user, "http://agent.test/agent", unique_capability("busy"))
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"]


def test_a_new_agent_whose_first_probe_could_not_look_up_is_offline_not_online(
    user: Api, hanging_names: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A probe that could not begin its lookup leaves an agent's status as it was; a new
    agent's was the placeholder it was stored with ("online"): routed to, never checked.
    Never checked, it is offline until a probe finds it."""
    from chalicelib.agents import registry

    checked = registry.check_endpoint_allowed

    def then_every_thread_held(url: str) -> None:
        checked(url)
        _every_lookup_thread_held()

    monkeypatch.setattr(registry, "check_endpoint_allowed", then_every_thread_held)
    response = register(user, "http://agent.test/agent", unique_capability("unprobed"))
    assert response.status_code == 201, response.text
    assert response.json()["data"]["status"] == "offline", response.text


def test_a_call_whose_lookup_could_not_begin_says_so_not_that_the_agent_timed_out(
    hanging_names: None,
) -> None:
    """A stage's call whose name lookup never began was reported as the agent's TIMEOUT
    (no complete answer within its timeout), though nothing was sent."""
    agent = ScriptedAgent(default=ok({"fine": True})).start()
    try:
        assert agent.server is not None
        url = f"http://agent.test:{agent.server.server_address[1]}/agent"
        _every_lookup_thread_held()
        task = AgentTask("wfr-busy", "s0", 1, "summarization", {"t": 1}, "busy", timeout_ms=500)
        with pytest.raises(AgentCallFailed) as caught:
            call_agent(url, "token", "agent-1", task)
        assert caught.value.code == "RESOLVER_BUSY", str(caught.value)
        assert "nothing was sent" in str(caught.value)
        assert agent.seen == []
    finally:
        agent.stop()


def test_a_submission_whose_callback_url_no_lookup_could_check_is_a_503_and_not_counted(
    user: Api, hanging_names: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same want of a lookup thread for a callback URL: a 503, and not counted against
    MAOF_SUBMISSIONS_PER_MINUTE (a refusal for this service's state, not for the request)."""
    monkeypatch.setattr(network, "CHECK_LOOKUP_SECONDS", 0.3)
    stage = {"id": "s0", "name": "Only", "agentCapability": unique_capability("cb-busy")}
    body: dict[str, Any] = {"workflow": {"name": "busy", "stages": [stage]}, "input": {}}
    _every_lookup_thread_held()
    callback = {"url": "http://hooks.test/hook", "secret": "s" * 32}
    saved = os.environ.get("MAOF_SUBMISSIONS_PER_MINUTE")
    os.environ["MAOF_SUBMISSIONS_PER_MINUTE"] = "1"
    reset_settings()
    try:
        busy = user.post("/workflows/execute", {**body, "callback": callback})
        assert busy.status_code == 503, busy.text
        assert user.post("/workflows/execute", body).status_code == 202  # the minute's one
    finally:
        os.environ.pop("MAOF_SUBMISSIONS_PER_MINUTE")
        if saved is not None:
            os.environ["MAOF_SUBMISSIONS_PER_MINUTE"] = saved
        reset_settings()
