"""Which agent endpoints MAOF may call: in `prod`, never loopback, private, link-local or
cloud metadata addresses (server-side request forgery), unless explicitly allowed."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlparse

from chalicelib.config import get_settings

METADATA_HOSTS = frozenset({"169.254.169.254", "fd00:ec2::254", "metadata.google.internal"})


class EndpointNotAllowed(Exception):
    """The endpoint resolves to an address MAOF refuses to call."""


def _forbidden(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_reserved
        or ip.is_multicast
        or ip.is_unspecified
        or str(ip) in METADATA_HOSTS
    )


def check_endpoint_allowed(endpoint: str) -> None:
    """Raise EndpointNotAllowed for endpoints the current stage may not call."""
    settings = get_settings()
    parsed = urlparse(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise EndpointNotAllowed("agent endpoints must be absolute http(s) URLs")
    if settings.is_dev or settings.allow_private_agent_endpoints:
        return
    host = parsed.hostname
    if host in METADATA_HOSTS:
        raise EndpointNotAllowed(f"{host} is a metadata address")
    try:
        infos = socket.getaddrinfo(host, parsed.port or 443, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        raise EndpointNotAllowed(f"{host} does not resolve") from None
    for info in infos:
        address = str(info[4][0])
        if _forbidden(address):
            raise EndpointNotAllowed(
                f"{host} resolves to {address}, a loopback, private, link-local or metadata "
                "address (set MAOF_ALLOW_PRIVATE_AGENT_ENDPOINTS=true to allow)"
            )
