"""The SSRF guard, in every stage: URLs are parsed once by the parser that connects, resolved
once, and refused unless every address is public (or, when private endpoints are allowed,
anything but a cloud metadata address); the call is pinned to the checked address."""

from __future__ import annotations

import pytest
import urllib3

from chalicelib.agents import network
from chalicelib.agents.dispatch import AgentCallFailed, AgentTask, call_agent, interpret
from chalicelib.agents.network import (
    EndpointNotAllowed,
    EndpointUnresolvable,
    address_allowed,
    check_endpoint_allowed,
    is_public_address,
    parse_endpoint,
    pool_for,
    resolve_and_check,
)
from chalicelib.agents.registry import RegisterAgentRequest
from chalicelib.config import reset_settings
from chalicelib.core import errors
from chalicelib.http import validate
from devstack.dev import allow_private_endpoints_by_default
from tests.support.dns import FakeResolver


@pytest.fixture
def resolver(monkeypatch):
    fake = FakeResolver(
        {
            "public.test": ["93.184.216.34"],
            "rebind.test": ["93.184.216.34", "127.0.0.1"],
            "two-public.test": ["93.184.216.34", "2606:4700:4700::1111"],
            "internal.test": ["10.1.2.3"],
            "metadata.test": ["169.254.169.254"],
            "localhost": ["127.0.0.1", "::1"],
        }
    )
    monkeypatch.setattr(network, "resolve_host", fake)
    return fake


@pytest.fixture
def guard_on(monkeypatch):
    monkeypatch.setenv("MAOF_ALLOW_PRIVATE_AGENT_ENDPOINTS", "false")
    reset_settings()
    yield monkeypatch
    reset_settings()


@pytest.fixture
def private_allowed(monkeypatch):
    monkeypatch.setenv("MAOF_ALLOW_PRIVATE_AGENT_ENDPOINTS", "true")
    reset_settings()
    yield monkeypatch
    reset_settings()


@pytest.fixture
def prod(monkeypatch):
    monkeypatch.setenv("MAOF_STAGE", "prod")
    monkeypatch.setenv("MAOF_JWT_SECRET", "x" * 40)
    monkeypatch.setenv("MAOF_SECRET_KEY", "y" * 40)
    monkeypatch.setenv("MAOF_DATABASE_URL", "postgresql://db/maof?sslmode=require")
    monkeypatch.setenv("MAOF_REDIS_URL", "rediss://cache:6379/0")
    monkeypatch.setenv("MAOF_ALLOW_PRIVATE_AGENT_ENDPOINTS", "false")
    monkeypatch.setenv("MAOF_ALLOW_INSECURE_CONNECTIONS", "true")  # the test stack's URLs
    monkeypatch.delenv("MAOF_MOCK_AGENTS", raising=False)
    reset_settings()
    yield monkeypatch
    reset_settings()


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("10.0.0.1", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("100.64.0.1", False),  # carrier-grade NAT
        ("127.0.0.1", False),
        ("169.254.169.254", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),  # multicast
        ("::1", False),
        ("fc00::1", False),
        ("fe80::1", False),
        ("ff02::1", False),
        ("::ffff:10.0.0.1", False),  # IPv4-mapped
        ("::ffff:127.0.0.1", False),
        ("2002:0a00:0001::", False),  # 6to4 around 10.0.0.1
        ("2002:7f00:1::", False),  # 6to4 around 127.0.0.1
        ("64:ff9b::7f00:1", False),  # NAT64 around 127.0.0.1
        ("64:ff9b:1::808:808", False),  # local-use NAT64
        ("::7f00:1", False),  # IPv4-compatible around 127.0.0.1
        ("::ffff:0:7f00:1", False),  # IPv4-translated around 127.0.0.1
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("::ffff:8.8.8.8", True),
        ("2002:0808:0808::", True),
        ("64:ff9b::808:808", True),
    ],
)
def test_address_classifier(address, public):
    assert is_public_address(address) is public


# One address in each range the IANA special-purpose registries mark not globally reachable
# (and deprecated site-local), whatever this Python's ipaddress.is_global says of it.
NOT_GLOBALLY_REACHABLE = [
    "0.1.2.3",
    "10.0.0.1",
    "100.64.0.1",
    "127.0.0.1",
    "169.254.1.1",
    "172.16.0.1",
    "192.0.0.1",  # DS-Lite
    "192.0.0.8",  # IPv4 dummy address
    "192.0.0.100",
    "192.0.0.170",  # NAT64 discovery
    "192.0.0.192",  # Oracle Cloud (classic) metadata
    "192.0.0.255",
    "192.0.2.1",
    "192.168.1.1",
    "198.18.0.1",
    "198.51.100.1",
    "203.0.113.1",
    "240.0.0.1",
    "255.255.255.255",
    "::",
    "::1",
    "64:ff9b:1::808:808",
    "100::1",
    "100:0:0:1::1",
    "2001:2::1",
    "2001:db8::1",
    "3fff::1",
    "3fff:fff::1",
    "5f00::1",
    "fc00::1",
    "fe80::1",
    "fec0::1",
    "feff::1",
]


@pytest.mark.parametrize("address", NOT_GLOBALLY_REACHABLE)
def test_special_purpose_addresses_that_are_not_globally_reachable_are_not_public(address):
    assert is_public_address(address) is False


@pytest.mark.parametrize(
    "address",
    [
        "::ffff:192.0.0.192",  # IPv4-mapped
        "64:ff9b::c000:c0",  # NAT64
        "2002:c000:c0::",  # 6to4
        "::c000:c0",  # IPv4-compatible
        "::ffff:0:c000:c0",  # IPv4-translated
        "::ffff:192.0.0.8",
        "64:ff9b::c000:8",
    ],
)
def test_special_purpose_ipv4_addresses_are_not_public_inside_ipv6_either(address):
    assert is_public_address(address) is False


@pytest.mark.parametrize("address", ["192.0.0.9", "192.0.0.10", "::ffff:192.0.0.9"])
def test_the_globally_reachable_anycast_addresses_in_192_0_0_0_24_stay_public(address):
    assert is_public_address(address) is True


@pytest.mark.parametrize(
    "url",
    ["http://192.0.0.170/", "http://[fec0::1]/", "http://dns64.test/"],
)
def test_with_the_guard_on_special_purpose_endpoints_are_refused(url, guard_on, monkeypatch):
    monkeypatch.setattr(network, "resolve_host", FakeResolver({"dns64.test": ["192.0.0.170"]}))
    with pytest.raises(EndpointNotAllowed, match="only to public addresses"):
        check_endpoint_allowed(url)


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254",
        "fd00:ec2::254",
        "::ffff:169.254.169.254",
        "169.254.170.2",
        "192.0.0.192",  # Oracle Cloud
        "169.254.0.23",  # Tencent Cloud
    ],
)
def test_metadata_addresses_are_refused_even_when_private_endpoints_are_allowed(address):
    assert address_allowed(address, allow_private=True) is False


@pytest.mark.parametrize(
    "address",
    [
        "64:ff9b:1::a9fe:a9fe",  # a /96 local-use NAT64 prefix
        "64:ff9b:1:0:a9:fea9:fe00:0",  # a /64 prefix (RFC 6052: bits 64-71 skipped)
        "64:ff9b:1:a9:fe:a9fe::",  # a /56 prefix
        "64:ff9b:1:a9fe:a9:fe00::",  # the /48 prefix
        "64:ff9b:1::a9fe:aa02",  # ECS task credentials, /96
        "64:ff9b:1::6464:64c8",  # Alibaba Cloud metadata, /96
    ],
)
def test_metadata_addresses_inside_local_use_nat64_are_refused_when_private_is_allowed(address):
    assert address_allowed(address, allow_private=True) is False


def test_a_metadata_address_behind_local_use_nat64_is_refused_as_metadata(private_allowed):
    with pytest.raises(EndpointNotAllowed, match="metadata"):
        check_endpoint_allowed("http://[64:ff9b:1::a9fe:a9fe]/latest/meta-data/")
    check_endpoint_allowed("http://[64:ff9b:1::a0a:a0a]:9001/agent")  # 10.10.10.10: private


@pytest.mark.parametrize("address", ["10.0.0.1", "127.0.0.1", "::1", "100.64.0.1"])
def test_allowing_private_endpoints_allows_private_addresses(address):
    assert address_allowed(address, allow_private=True) is True
    assert address_allowed(address, allow_private=False) is False


SHAPE_REFUSED = [
    "http://127.0.0.1:9\\@8.8.8.8/",  # urlparse sees 8.8.8.8, urllib3 connected to 127.0.0.1
    "http://user:pass@example.com/",
    "http://user@example.com/",
    "http://2130706433/",
    "http://0x7f.1/",
    "http://0x7f/",
    "http://127.1/",
    "http://0177.0.0.1/",
    "http://127.000.000.001/",
    "http://exa%6dple.com/",
    "http://[fe80::1%25eth0]/",
    "http://example.com /",
    "http://example.com/\tagent",
    "http://münchen.de/",
    "http://example.com./",
    "http://-bad-.example.com/",
    "http://example.com:0/",
    "http://example.com:99999/",
    "http://[::1/",
    "ftp://example.com/",
    "mock://example",
    "//example.com/agent",
    "not a url",
]


@pytest.mark.parametrize("url", SHAPE_REFUSED)
def test_url_shapes_that_hide_where_a_request_goes_are_refused_before_any_lookup(
    url, resolver, private_allowed
):
    with pytest.raises(EndpointNotAllowed):
        check_endpoint_allowed(url)
    assert resolver.asked == []


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://example.com/agent", ("http", "example.com", 80, "/agent")),
        (
            "HTTPS://Agents.Example.COM:8443/a?b=1#f",
            ("https", "agents.example.com", 8443, "/a?b=1"),
        ),
        ("http://8.8.8.8:9001", ("http", "8.8.8.8", 9001, "/")),
        ("https://[2606:4700:4700::1111]/x", ("https", "2606:4700:4700::1111", 443, "/x")),
        ("http://xn--mnchen-3ya.de/", ("http", "xn--mnchen-3ya.de", 80, "/")),
    ],
)
def test_plain_urls_are_parsed_into_where_the_request_goes(url, expected):
    assert parse_endpoint(url) == expected


@pytest.mark.parametrize(
    ("url", "leak"),
    [
        ("http://[::ffff:127.0.0.1]/", "127.0.0.1"),
        ("http://169.254.169.254/", "169.254.169.254"),
        ("http://100.64.0.1/", "100.64.0.1"),
        ("http://[2002:7f00:1::]/", "2002"),
        ("http://10.0.0.5:9001/agent", "10.0.0.5"),
        ("http://localhost:9001/agent", "127.0.0.1"),
        ("http://internal.test/agent", "10.1.2.3"),
        ("http://rebind.test/agent", "127.0.0.1"),  # public first, loopback second
        ("http://metadata.test/", "169.254.169.254"),
    ],
)
def test_with_the_guard_on_non_public_addresses_are_refused_without_naming_them(
    url, leak, resolver, guard_on
):
    with pytest.raises(EndpointNotAllowed) as refused:
        resolve_and_check(url)
    assert leak not in str(refused.value)


def test_every_resolved_address_must_be_allowed_not_just_the_first(resolver, guard_on):
    with pytest.raises(EndpointNotAllowed, match="only to public addresses"):
        resolve_and_check("http://rebind.test/agent")


def test_a_public_name_is_pinned_to_its_first_checked_address(resolver, guard_on):
    target = resolve_and_check("https://two-public.test:8443/agent?x=1")
    assert (target.address, target.hostname, target.port) == (
        "93.184.216.34",
        "two-public.test",
        8443,
    )
    assert target.request_uri == "/agent?x=1"
    assert target.host_header == "two-public.test:8443"
    assert resolver.asked == ["two-public.test"]


def test_an_ip_literal_is_not_looked_up(resolver, guard_on):
    assert resolve_and_check("http://8.8.8.8/").address == "8.8.8.8"
    assert resolver.asked == []


def test_with_the_guard_on_does_not_resolve_reads_like_resolves_privately(resolver, guard_on):
    # Otherwise registration would tell a caller which internal names exist.
    with pytest.raises(EndpointUnresolvable) as unresolvable:
        resolve_and_check("http://nowhere.test/")
    with pytest.raises(EndpointNotAllowed) as private:
        resolve_and_check("http://internal.test/")
    assert str(unresolvable.value) == str(private.value)


def test_allowing_private_endpoints_keeps_metadata_and_shape_checks(resolver, private_allowed):
    assert resolve_and_check("http://internal.test/").address == "10.1.2.3"
    assert resolve_and_check("http://127.0.0.1:9001/agent").address == "127.0.0.1"
    with pytest.raises(EndpointNotAllowed, match="metadata"):
        resolve_and_check("http://metadata.test/")
    with pytest.raises(EndpointNotAllowed, match="metadata"):
        resolve_and_check("http://[::ffff:169.254.169.254]/")
    with pytest.raises(EndpointNotAllowed):
        resolve_and_check("http://127.0.0.1:9\\@8.8.8.8/")


@pytest.mark.parametrize("stage", ["dev", "test", "prod"])
def test_the_guard_is_on_in_every_stage(stage, monkeypatch, resolver):
    monkeypatch.setenv("MAOF_STAGE", stage)
    monkeypatch.setenv("MAOF_JWT_SECRET", "x" * 40)
    monkeypatch.setenv("MAOF_SECRET_KEY", "y" * 40)
    monkeypatch.setenv("MAOF_ALLOW_PRIVATE_AGENT_ENDPOINTS", "false")
    monkeypatch.setenv("MAOF_ALLOW_INSECURE_CONNECTIONS", "true")  # the test stack's URLs
    reset_settings()
    try:
        with pytest.raises(EndpointNotAllowed):
            check_endpoint_allowed("http://127.0.0.1:9001/agent")
    finally:
        reset_settings()


def test_private_endpoints_are_refused_unless_allowed_by_default(monkeypatch):
    monkeypatch.delenv("MAOF_ALLOW_PRIVATE_AGENT_ENDPOINTS")
    reset_settings()
    try:
        with pytest.raises(EndpointNotAllowed):
            check_endpoint_allowed("http://127.0.0.1:9001/agent")
    finally:
        reset_settings()


def test_https_pools_connect_to_the_address_and_verify_the_name(resolver, guard_on):
    pool = pool_for(resolve_and_check("https://public.test:8443/agent"))
    assert isinstance(pool, urllib3.HTTPSConnectionPool)
    assert (pool.host, pool.port) == ("93.184.216.34", 8443)
    assert pool.conn_kw["server_hostname"] == "public.test"
    assert pool.assert_hostname == "public.test"


def test_pools_are_reused_per_address_and_name_and_bounded(resolver, guard_on, monkeypatch):
    monkeypatch.setattr(network, "MAX_POOLS", 2)
    first = pool_for(resolve_and_check("http://public.test/a"))
    assert pool_for(resolve_and_check("http://public.test/b")) is first
    pool_for(resolve_and_check("http://8.8.8.8/"))
    pool_for(resolve_and_check("http://8.8.4.4/"))
    assert len(network._pools) == 2
    assert pool_for(resolve_and_check("http://public.test/a")) is not first


TASK = AgentTask("wfr-1", "s1", 1, "summarization", {"t": 1}, "wf")


def test_a_refused_endpoint_fails_the_call_for_good_without_naming_addresses(resolver, guard_on):
    with pytest.raises(AgentCallFailed) as failed:
        call_agent("http://rebind.test/agent", "token", "a1", TASK)
    assert (failed.value.code, failed.value.retryable) == ("ENDPOINT_NOT_ALLOWED", False)
    assert "127.0.0.1" not in str(failed.value) and "93.184" not in str(failed.value)


def test_a_name_that_does_not_resolve_at_call_time_is_retryable(resolver, guard_on):
    with pytest.raises(AgentCallFailed) as failed:
        call_agent("http://nowhere.test/agent", "token", "a1", TASK)
    assert (failed.value.code, failed.value.retryable) == ("UNREACHABLE", True)


def test_a_redirect_is_a_final_failure_and_is_never_followed():
    with pytest.raises(AgentCallFailed) as failed:
        interpret(302, b"")
    assert (failed.value.code, failed.value.retryable) == ("REDIRECT_REFUSED", False)


def test_in_prod_calling_a_mock_endpoint_fails_the_stage(prod):
    with pytest.raises(AgentCallFailed) as failed:
        call_agent("mock://summarizer", "token", "a1", TASK)
    assert (failed.value.code, failed.value.retryable) == ("MOCK_AGENTS_DISABLED", False)


def test_in_prod_registering_a_mock_endpoint_is_a_400_naming_endpoint(prod):
    body = {
        "agentId": "a1",
        "name": "A",
        "endpoint": "mock://summarizer",
        "authToken": "t",
        "capabilities": ["summarization"],
    }
    with pytest.raises(errors.ValidationError) as refused:
        validate(RegisterAgentRequest, body)
    assert [d["field"] for d in refused.value.details or []] == ["endpoint"]


def test_mock_agents_true_enables_mock_endpoints_in_prod(prod):
    prod.setenv("MAOF_MOCK_AGENTS", "true")
    reset_settings()
    output = call_agent("mock://summarizer", "token", "a1", TASK).value
    assert output["capability"] == "summarization"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, "true"),
        ({"MAOF_ALLOW_PRIVATE_AGENT_ENDPOINTS": ""}, "true"),
        ({"MAOF_ALLOW_PRIVATE_AGENT_ENDPOINTS": "false"}, "false"),
        ({"MAOF_ALLOW_PRIVATE_AGENT_ENDPOINTS": "true"}, "true"),
    ],
)
def test_make_dev_allows_private_endpoints_unless_told_otherwise(environ, expected):
    allow_private_endpoints_by_default(environ)
    assert environ["MAOF_ALLOW_PRIVATE_AGENT_ENDPOINTS"] == expected


# ------------------------------------------------------------------ the deadline watchdog


def test_the_watchdog_shuts_a_socket_down_at_its_deadline_and_says_so() -> None:
    """A blocked read ends at the deadline (what a per-read timeout cannot do against an
    answer paced a byte at a time); a socket unwatched in time is left alone."""
    import socket
    import time

    from chalicelib.agents.network import _shut, _watchdog

    ours, theirs = socket.socketpair()
    kept, other = socket.socketpair()
    with ours, theirs, kept, other:
        late = _watchdog.watch(lambda: _shut(kept), time.monotonic() + 60)
        key = _watchdog.watch(lambda: _shut(ours), time.monotonic() + 0.3)
        started = time.monotonic()
        assert ours.recv(1) == b""  # the watchdog's shutdown, not a byte
        assert 0.25 <= time.monotonic() - started < 2
        assert _watchdog.unwatch(key) is False
        assert _watchdog.unwatch(late) is True
        other.sendall(b"x")
        assert kept.recv(1) == b"x"


def test_the_watchdog_keeps_only_what_it_watches() -> None:
    """Deadlines far off (a 14-minute stage timeout) and calls that end at once: the heap
    does not grow with every call ever made."""
    import socket
    import time

    from chalicelib.agents.network import _Watchdog

    watchdog = _Watchdog()
    ours, theirs = socket.socketpair()
    with ours, theirs:
        for _ in range(10_000):
            watchdog.unwatch(watchdog.watch(lambda: None, time.monotonic() + 840))
        assert len(watchdog._due) <= 256 + 1
