"""The SSRF guard: which URLs MAOF may call, and the pinned connection each call goes over."""

from __future__ import annotations

import concurrent.futures
import contextlib
import heapq
import http.client
import ipaddress
import itertools
import re
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import urllib3
import urllib3.connection
import urllib3.response
from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

from chalicelib.config import get_settings
from chalicelib.core import errors
from chalicelib.logs import logger

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Credentials endpoints: refused even when the operator allows private endpoints.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # EC2 instance metadata (also GCP, Azure, Oracle)
        "fd00:ec2::254",  # EC2 instance metadata over IPv6
        "169.254.170.2",  # ECS task credentials
        "169.254.170.23",  # EKS Pod Identity credentials
        "fd00:ec2::23",  # EKS Pod Identity credentials over IPv6
        "100.100.100.200",  # Alibaba Cloud metadata
        "192.0.0.192",  # Oracle Cloud metadata (older instances)
        "169.254.0.23",  # Tencent Cloud metadata
    )
)
# IPv6 ranges whose last 32 bits are an IPv4 address a connection may end up reaching.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")
# Local-use NAT64 (RFC 8215) reaches into the operator's own network; where in the address
# the IPv4 goes depends on the prefix length the operator chose.
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")

# The IANA special-purpose registries' "Globally Reachable: False" ranges, refused whatever
# ipaddress.is_global says: its list lags the registries and differs between patch releases
# (3.11.7 calls 192.0.0.192, fec0::1 and 3fff::1 global). IPv4-mapped and 6to4 addresses
# are judged by the IPv4 address they carry.
_NOT_GLOBALLY_REACHABLE = tuple(
    ipaddress.ip_network(network)
    for network in (
        "0.0.0.0/8",  # "this network" (RFC 791)
        "10.0.0.0/8",  # private use (RFC 1918)
        "100.64.0.0/10",  # carrier-grade NAT (RFC 6598)
        "127.0.0.0/8",  # loopback (RFC 1122)
        "169.254.0.0/16",  # link-local (RFC 3927)
        "172.16.0.0/12",  # private use (RFC 1918)
        "192.0.0.0/24",  # IETF protocol assignments (RFC 6890), but for the two below
        "192.0.2.0/24",  # documentation (RFC 5737)
        "192.168.0.0/16",  # private use (RFC 1918)
        "198.18.0.0/15",  # benchmarking (RFC 2544)
        "198.51.100.0/24",  # documentation (RFC 5737)
        "203.0.113.0/24",  # documentation (RFC 5737)
        "240.0.0.0/4",  # reserved (RFC 1112)
        "255.255.255.255/32",  # limited broadcast (RFC 919)
        "::/128",  # unspecified (RFC 4291)
        "::1/128",  # loopback (RFC 4291)
        str(_LOCAL_NAT64),  # local-use NAT64 (RFC 8215)
        "100::/64",  # discard-only (RFC 6666)
        "100:0:0:1::/64",  # dummy prefix (RFC 9780)
        # IETF protocol assignments (RFC 2928), Teredo included; the few globally reachable
        # ones in it (anycast services, AS112, ORCHIDv2) are no agent's endpoint.
        "2001::/23",
        "2001:db8::/32",  # documentation (RFC 3849)
        "3fff::/20",  # documentation (RFC 9637)
        "5f00::/16",  # segment routing (SRv6) SIDs (RFC 9602)
        "fc00::/7",  # unique local (RFC 4193)
        "fe80::/10",  # link-local (RFC 4291)
        "fec0::/10",  # site-local, deprecated (RFC 3879) but still routed inside a site
    )
)
# Globally reachable per IANA, though inside 192.0.0.0/24.
_GLOBALLY_REACHABLE = (
    ipaddress.IPv4Network("192.0.0.9/32"),  # Port Control Protocol anycast (RFC 7723)
    ipaddress.IPv4Network("192.0.0.10/32"),  # TURN anycast (RFC 8155)
)

_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_POOLS = 50
POOL_MAXSIZE = 10

PUBLIC_ONLY = "it must resolve only to public addresses"


class EndpointNotAllowed(Exception):
    """The guard refuses this URL. The message is safe to show: it never names an address."""


class EndpointUnresolvable(EndpointNotAllowed):
    """The URL is well-formed but its host name resolves to no address (perhaps for now)."""


@dataclass(frozen=True)
class Target:
    """Where one guarded request goes: the checked URL's parts and the address it is pinned to."""

    scheme: str
    hostname: str  # lower-case; an IPv6 literal without brackets
    port: int
    request_uri: str
    address: str

    @property
    def host_header(self) -> str:
        host = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


def _is_dotted_quad(host: str) -> bool:
    try:
        return str(ipaddress.IPv4Address(host)) == host
    except ValueError:
        return False


def _is_dns_name(host: str) -> bool:
    labels = host.split(".")
    if len(host) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        return False
    # `2130706433`, `0x7f.1`, `127.1`, `0x7f`: the resolver reads these as IPv4 numbers.
    if labels[-1].isdigit():
        return False
    try:
        socket.inet_aton(host)
    except OSError:
        return True
    return False


def _plain_host(authority: str) -> tuple[str, int | None]:
    """The host and port of a raw authority, or EndpointNotAllowed."""
    if authority.startswith("["):
        literal, bracket, rest = authority[1:].partition("]")
        try:
            host = str(ipaddress.IPv6Address(literal if bracket else ""))
        except ValueError:
            raise EndpointNotAllowed("its host is not a valid IPv6 address") from None
    else:
        host, colon, port_text = authority.partition(":")
        rest = colon + port_text
        if not (_is_dotted_quad(host) or _is_dns_name(host.lower())):
            raise EndpointNotAllowed(
                "its host must be a DNS name, a dotted-quad IPv4 or a bracketed IPv6 address"
            )
        host = host.lower()
    if not rest:
        return host, None
    if not re.fullmatch(r":[0-9]{1,5}", rest) or not 1 <= int(rest[1:]) <= 65535:
        raise EndpointNotAllowed("its port must be a number from 1 to 65535")
    return host, int(rest[1:])


def parse_endpoint(url: str) -> tuple[str, str, int, str]:
    """`(scheme, hostname, port, request_uri)` of a URL the guard accepts the shape of, or
    EndpointNotAllowed. Parsed by urllib3, the parser that connects, and cross-checked."""
    if not url.isascii() or any(ch <= " " or ch in "\\\x7f" for ch in url):
        raise EndpointNotAllowed(
            "it must not contain backslashes, spaces, control or non-ASCII characters"
        )
    scheme, separator, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme not in _DEFAULT_PORTS or not separator:
        raise EndpointNotAllowed("it must be an absolute http:// or https:// URL")
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in authority:
        raise EndpointNotAllowed("it must not contain a user name or password")
    if "%" in authority:
        raise EndpointNotAllowed("its host must not be percent-encoded")
    if not authority:
        raise EndpointNotAllowed("it must be an absolute http:// or https:// URL")
    host, port = _plain_host(authority)
    try:
        parsed = parse_url(url)
    except LocationParseError:
        raise EndpointNotAllowed("it must be an absolute http:// or https:// URL") from None
    # Two parsers must agree on where the request goes, or neither is trusted.
    urllib3_host = _canonical_ip((parsed.host or "").strip("[]"))
    agreed = (parsed.scheme, urllib3_host, parsed.port) == (scheme, host, port)
    if parsed.auth is not None or not agreed:
        raise EndpointNotAllowed("it must be an absolute http:// or https:// URL")
    return scheme, host, port or _DEFAULT_PORTS[scheme], parsed.request_uri


def _canonical_ip(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def _reachable(ip: IPAddress) -> list[IPAddress]:
    """The addresses a connection to `ip` may really reach: `ip`, and any IPv4 it embeds."""
    if isinstance(ip, ipaddress.IPv4Address):
        return [ip]
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]  # a dual-stack socket connects to the IPv4 address itself
    embedded: list[IPAddress] = []
    if ip.sixtofour is not None:
        embedded.append(ip.sixtofour)
    if ip.teredo is not None:
        embedded.extend(ip.teredo)
    if any(ip in network for network in (_NAT64, _IPV4_COMPATIBLE, _IPV4_TRANSLATED)):
        embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip in _LOCAL_NAT64:
        embedded.extend(_local_nat64_embedded(ip))
    return [ip, *embedded]


def _local_nat64_embedded(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 address a local-use NAT64 address carries under each prefix length its
    operator may have chosen inside 64:ff9b:1::/48: /48, /56, /64 or /96 (RFC 6052 2.2,
    bits 64-71 skipped). Which one is in use, the guard cannot know: it checks them all."""
    bits = int(ip)
    without_bits_64_to_71 = (bits >> 64 << 56) | (bits & ((1 << 56) - 1))  # 120 bits
    return [
        ipaddress.IPv4Address(without_bits_64_to_71 >> shift & 0xFFFFFFFF)
        for shift in (40, 32, 24, 0)  # the /48, /56, /64 and /96 positions
    ]


def _globally_reachable(ip: IPAddress) -> bool:
    """Whether `ip` is global unicast: for Python, and for the IANA registries too."""
    if not any(ip in network for network in _GLOBALLY_REACHABLE) and any(
        ip in network for network in _NOT_GLOBALLY_REACHABLE
    ):
        return False
    return ip.is_global and not ip.is_multicast


def is_public_address(address: str | IPAddress) -> bool:
    """Whether `address` is globally reachable unicast, and so is every IPv4 address it
    embeds."""
    ip = ipaddress.ip_address(address)
    reachable = _reachable(ip)
    if isinstance(ip, ipaddress.IPv6Address) and ip.sixtofour is not None:
        # 6to4 only wraps the IPv4 inside, which decides; Python's own verdict on 2002::/16
        # differs between releases (3.11.2: private, 3.11.7: global).
        reachable = reachable[1:]
    return all(_globally_reachable(a) for a in reachable)


def is_metadata_address(address: str | IPAddress) -> bool:
    """Whether `address` is, or embeds, a cloud metadata or credentials address."""
    return any(a in METADATA_ADDRESSES for a in _reachable(ipaddress.ip_address(address)))


def address_allowed(address: str | IPAddress, *, allow_private: bool) -> bool:
    """Public addresses only; with `allow_private`, anything but metadata addresses."""
    if is_metadata_address(address):
        return False
    return allow_private or is_public_address(address)


def resolve_host(hostname: str, port: int) -> list[str]:
    """Every address `hostname` resolves to, in the resolver's order (tests replace this)."""
    try:
        infos = socket.getaddrinfo(hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class ResolverBusy(TimeoutError):
    """No lookup thread came free by the deadline: the name was never looked up, which says
    nothing of it (a health probe leaves the agent's status as it was)."""


# A lookup given up at its deadline still holds its thread until the system resolver gives
# up too (tens of seconds against a name server that never answers). So a lookup of a name
# already being looked up waits on that lookup rather than taking a thread (one name holds
# one thread, however many agents, probes or calls name it), and LOOKUP_THREADS are enough
# that a batch's hostile names (10 records, and the stages handed slots) leave lookups for
# the other stages. Bounded per name, not per owner: agent calls, callbacks and
# registrations share these threads and name no owner. What one owner's many hung names can
# still cost the others is a lookup that never starts (ResolverBusy), never a verdict on
# their agents. Threads start only as lookups need them.
LOOKUP_THREADS = 32
_lookup_threads = threading.BoundedSemaphore(LOOKUP_THREADS)
_lookups: dict[tuple[str, int], concurrent.futures.Future[list[str]]] = {}
_lookups_lock = threading.Lock()


def _look_up(key: tuple[str, int], lookup: concurrent.futures.Future[list[str]]) -> None:
    try:
        lookup.set_result(resolve_host(*key))
    except BaseException as exc:  # handed to whoever waits on it, as a pool's worker does
        lookup.set_exception(exc)
    finally:
        with _lookups_lock:
            del _lookups[key]
        _lookup_threads.release()


def _lookup(hostname: str, port: int, deadline: float) -> concurrent.futures.Future[list[str]]:
    """The lookup of `hostname` in flight, or a new one on a thread of its own once one of
    LOOKUP_THREADS is free (ResolverBusy if none is by `deadline`)."""
    key = (hostname, port)
    with _lookups_lock:
        if (running := _lookups.get(key)) is not None:
            return running
    if not _lookup_threads.acquire(timeout=max(0.0, deadline - time.monotonic())):
        raise ResolverBusy("no thread was free to look the name up in time")
    with _lookups_lock:
        if (running := _lookups.get(key)) is not None:  # begun while this one waited
            _lookup_threads.release()
            return running
        lookup = _lookups[key] = concurrent.futures.Future()
    try:
        threading.Thread(target=_look_up, args=(key, lookup), name="maof-dns", daemon=True).start()
    except BaseException as exc:  # no thread to be had: the slot and the name are free again
        with _lookups_lock:
            del _lookups[key]
        _lookup_threads.release()
        lookup.set_exception(exc)
        raise
    return lookup


def _resolve_by(hostname: str, port: int, deadline: float | None) -> list[str]:
    """resolve_host, given up (TimeoutError) at `deadline`: getaddrinfo itself has no
    timeout, so a hung resolver must not hold a call past it; ResolverBusy if the lookup
    could not even begin by then."""
    if deadline is None:
        return resolve_host(hostname, port)
    lookup = _lookup(hostname, port, deadline)
    try:
        return list(lookup.result(timeout=max(0.0, deadline - time.monotonic())))
    except concurrent.futures.TimeoutError:
        raise TimeoutError("name resolution did not finish in time") from None


def resolve_and_check(url: str, deadline: float | None = None) -> Target:
    """The target to send a request for `url` to, resolved once (by `deadline`, a
    time.monotonic() value), every address checked; or EndpointNotAllowed
    (EndpointUnresolvable when the name resolves to nothing)."""
    scheme, hostname, port, request_uri = parse_endpoint(url)
    allow_private = get_settings().allow_private_agent_endpoints
    try:
        addresses = [str(ipaddress.ip_address(hostname))]
    except ValueError:
        addresses = _resolve_by(hostname, port, deadline)
    if not addresses:
        # With the check on, "does not resolve" and "resolves privately" read the same, so
        # registration is no oracle for internal DNS names.
        raise EndpointUnresolvable(
            "its host name does not resolve" if allow_private else PUBLIC_ONLY
        )
    refused = [a for a in addresses if not address_allowed(a, allow_private=allow_private)]
    if refused:
        # The addresses stay in the server's log; the caller learns only the rule.
        logger.warning(
            "endpoint refused by the SSRF guard",
            extra={"host": hostname, "port": port, "refusedAddresses": refused},
        )
        if any(is_metadata_address(a) for a in refused):
            raise EndpointNotAllowed("it must not resolve to a cloud metadata address")
        raise EndpointNotAllowed(PUBLIC_ONLY)
    return Target(scheme, hostname, port, request_uri, addresses[0])


# How long registering an agent or submitting a callback URL waits for its name to resolve.
CHECK_LOOKUP_SECONDS = 5.0


def check_endpoint_allowed(url: str) -> None:
    """Raise EndpointNotAllowed unless the guard would let MAOF call `url` now (a name that
    does not resolve within CHECK_LOOKUP_SECONDS does not: a request must not wait on a
    hostile name server for as long as the system resolver would)."""
    try:
        resolve_and_check(url, time.monotonic() + CHECK_LOOKUP_SECONDS)
    except ResolverBusy:  # this service's lookups are all taken: says nothing of the name
        raise errors.ServiceUnavailable(
            "No name lookup could begin in time; try again shortly"
        ) from None
    except TimeoutError:
        allow_private = get_settings().allow_private_agent_endpoints
        raise EndpointUnresolvable(
            "its host name did not resolve in time" if allow_private else PUBLIC_ONLY
        ) from None


def _shut(sock: socket.socket | None) -> None:
    """A blocked read on the socket ends at once (the plain socket's shutdown: an SSL
    socket's own would unwrap it under the reader)."""
    if sock is not None:
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Watchdog:
    """Cuts a request off at its deadline. A per-read timeout cannot bound an answer sent
    a byte at a time (every read returns in time: a status line and headers, a chunk's size
    line), and http.client has no total timeout; a blocked read on a socket shut down ends
    at once. One thread for all."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._due: list[tuple[float, int]] = []  # (deadline, key), a heap
        self._watched: dict[int, tuple[Callable[[], None], float]] = {}
        self._keys = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, cut: Callable[[], None], deadline: float) -> int:
        """Call `cut` at `deadline` unless unwatched first."""
        with self._lock:
            key = next(self._keys)
            self._watched[key] = (cut, deadline)
            heapq.heappush(self._due, (deadline, key))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="maof-cutoff", daemon=True)
                self._thread.start()
            elif self._due[0][1] == key:
                self._lock.notify()  # sooner than what it sleeps for
            return key

    def unwatch(self, key: int) -> bool:
        """Stop watching; False if the deadline came first and the request was cut off."""
        with self._lock:
            watched = self._watched.pop(key, None) is not None
            if len(self._due) > 4 * len(self._watched) + 256:
                # Unwatched entries leave the heap when they come up; with long deadlines
                # they would pile up first: keep only the watched ones (amortised O(1)).
                self._due = [(deadline, k) for k, (_, deadline) in self._watched.items()]
                heapq.heapify(self._due)
            return watched

    def _run(self) -> None:
        with self._lock:
            while True:
                while self._due and self._due[0][1] not in self._watched:
                    heapq.heappop(self._due)  # unwatched in time
                if not self._due:
                    self._lock.wait()
                    continue
                deadline, key = self._due[0]
                if (wait := deadline - time.monotonic()) > 0:
                    self._lock.wait(wait)
                    continue
                heapq.heappop(self._due)
                cut, _ = self._watched.pop(key)
                try:
                    cut()
                except Exception as exc:  # the watchdog must outlive any one request
                    logger.warning("could not cut a request off", extra={"error": repr(exc)})


_watchdog = _Watchdog()
_head_deadline = threading.local()  # the time.monotonic() deadline of this thread's request


@contextlib.contextmanager
def _cut_off_at(deadline: float, cut: Callable[[], None]) -> Iterator[None]:
    """The block ends by `deadline`: then `cut()` shuts the socket it reads from down, and
    its read fails; TimeoutError (urllib3 reports it as a socket timeout) either way."""
    key = _watchdog.watch(cut, deadline)
    try:
        yield
    finally:
        if not _watchdog.unwatch(key):
            raise TimeoutError("no complete answer by the deadline")


def _head_by_deadline(conn: Any, read_head: Callable[[], Any]) -> Any:
    """Read the status line and headers by the request's deadline (pinned_request's)."""
    deadline: float | None = getattr(_head_deadline, "value", None)
    if deadline is None:
        return read_head()
    with _cut_off_at(deadline, lambda: _shut(conn.sock)):
        return read_head()


class _FinalResponse(http.client.HTTPResponse):
    """An answer read past its interim 1xx answers (RFC 9110 15.2: 102 Processing, 103
    Early Hints, …), by the same deadline, to the final one: http.client skips only 100
    Continue, and took a 103 for the answer, leaving the real one on the connection for
    the next request sent over it. 101 is no interim answer (the protocol switched: we
    never ask to) and ends the reading, as any other final status."""

    def _read_status(self) -> tuple[str, int, str]:
        while True:
            version, status, reason = super()._read_status()  # type: ignore[misc]
            if not 100 <= status < 200 or status == 101:
                return version, status, reason
            http.client.parse_headers(self.fp)  # its headers, skipped (at most 100 lines)


class _HTTPConnection(urllib3.connection.HTTPConnection):
    response_class = _FinalResponse

    def getresponse(self) -> urllib3.response.HTTPResponse:  # type: ignore[override]
        return cast(urllib3.response.HTTPResponse, _head_by_deadline(self, super().getresponse))


class _HTTPSConnection(urllib3.connection.HTTPSConnection):
    response_class = _FinalResponse

    def getresponse(self) -> urllib3.response.HTTPResponse:  # type: ignore[override]
        return cast(urllib3.response.HTTPResponse, _head_by_deadline(self, super().getresponse))


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


def read_by(response: urllib3.BaseHTTPResponse, deadline: float, limit: int) -> bytes:
    """The body, up to `limit` + 1 bytes, read by `deadline` (TimeoutError past it): the
    watchdog cuts the read off then, however the bytes are paced (a per-read timeout
    cannot: a chunk's size line a byte at a time is one read of ours, many of
    http.client's), while the body is unread (once it is, urllib3 puts the connection back
    in its pool, for another request). A body not read to its end closes the connection:
    kept, the rest of it, arriving late, would be read as the next request's answer. So
    does a 101 answer, read as none (b"")."""

    def cut() -> None:
        if not response.closed:
            response.shutdown()  # urllib3's: the socket the body is read from

    if response.status < 200:
        # A 101 (never asked for, never read as an answer): the connection speaks some
        # other protocol now, and must carry no other request.
        response.close()
        return b""
    chunks: list[bytes] = []
    size = 0
    try:
        with _cut_off_at(deadline, cut):
            while size <= limit:
                chunk = response.read1(min(65536, limit + 1 - size), decode_content=True)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
    except BaseException:
        response.close()
        raise
    if size > limit:
        # Cut at the cap, the rest unread: released, the connection would go back to its
        # pool with it, and the next request over it read it as its answer.
        response.close()
    return b"".join(chunks)


def time_left(deadline: float) -> float:
    """Seconds until `deadline` (time.monotonic()); TimeoutError once it has passed."""
    if (left := deadline - time.monotonic()) <= 0:
        raise TimeoutError("no complete answer by the deadline")
    return left


_pools: OrderedDict[tuple[str, str, int, str], urllib3.HTTPConnectionPool] = OrderedDict()
_pools_lock = threading.Lock()


def _new_pool(target: Target) -> urllib3.HTTPConnectionPool:
    if target.scheme == "https":
        # Connect to the checked address; SNI and the certificate check use the name.
        return _HTTPSPool(
            target.address,
            target.port,
            maxsize=POOL_MAXSIZE,
            retries=False,
            cert_reqs="CERT_REQUIRED",
            server_hostname=target.hostname,
            assert_hostname=target.hostname,
        )
    return _HTTPPool(target.address, target.port, maxsize=POOL_MAXSIZE, retries=False)


def pool_for(target: Target) -> urllib3.HTTPConnectionPool:
    """A connection pool to `target.address` (kept warm across calls, at most MAX_POOLS)."""
    key = (target.scheme, target.address, target.port, target.hostname)
    with _pools_lock:
        pool = _pools.pop(key, None)
        if pool is None:
            pool = _new_pool(target)
        _pools[key] = pool
        while len(_pools) > MAX_POOLS:
            _pools.popitem(last=False)[1].close()
    return pool


def pinned_request(
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    timeout: urllib3.Timeout,
    deadline: float | None = None,
) -> urllib3.BaseHTTPResponse:
    """One request to `url`, connected to the address the guard checked (no second DNS
    lookup), never following a redirect. Raises EndpointNotAllowed before connecting (and
    TimeoutError if the lookup outlasts `deadline`, urllib3's ReadTimeoutError if the
    status line and headers do); the body is not preloaded: read it (read_by), then
    `release_conn()`."""
    target = resolve_and_check(url, deadline)
    if deadline is not None:
        # The lookup took part of the time: connect within what is left of it (a slow
        # name server and a paced TLS handshake held a 2 s health probe 3.5 s).
        left = max(deadline - time.monotonic(), 0.001)
        connect = timeout.connect_timeout
        connect = min(connect, left) if isinstance(connect, int | float) else left
        timeout = urllib3.Timeout(connect=connect, read=timeout.read_timeout)
    _head_deadline.value = deadline
    try:
        return pool_for(target).urlopen(
            method,
            target.request_uri,
            body=body,
            headers={**(headers or {}), "Host": target.host_header},
            timeout=timeout,
            retries=False,
            redirect=False,
            assert_same_host=False,
            preload_content=False,
        )
    finally:
        _head_deadline.value = None
