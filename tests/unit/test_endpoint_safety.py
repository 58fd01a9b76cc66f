"""In prod, agent endpoints on loopback, private, link-local or metadata addresses are refused."""

from __future__ import annotations

import pytest

from chalicelib.agents.network import EndpointNotAllowed, check_endpoint_allowed
from chalicelib.config import reset_settings


@pytest.fixture
def prod(monkeypatch):
    monkeypatch.setenv("MAOF_STAGE", "prod")
    monkeypatch.setenv("MAOF_JWT_SECRET", "x" * 40)
    monkeypatch.setenv("MAOF_SECRET_KEY", "y" * 40)
    monkeypatch.setenv("MAOF_DATABASE_URL", "postgresql://db/maof?sslmode=require")
    monkeypatch.setenv("MAOF_REDIS_URL", "rediss://cache:6379/0")
    reset_settings()
    yield monkeypatch
    reset_settings()


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://127.0.0.1:9001/agent",
        "http://localhost/agent",
        "http://10.0.0.5/agent",
        "http://192.168.1.2/agent",
        "http://172.16.0.1/agent",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/agent",
        "http://0.0.0.0/agent",
    ],
)
def test_prod_refuses_internal_endpoints(prod, endpoint):
    with pytest.raises(EndpointNotAllowed):
        check_endpoint_allowed(endpoint)


def test_prod_allows_internal_endpoints_when_explicitly_allowed(prod):
    prod.setenv("MAOF_ALLOW_PRIVATE_AGENT_ENDPOINTS", "true")
    reset_settings()
    check_endpoint_allowed("http://10.0.0.5/agent")


def test_public_address_is_allowed_in_prod(prod):
    check_endpoint_allowed("http://93.184.216.34/agent")


def test_dev_and_test_stages_allow_local_agents():
    reset_settings()
    check_endpoint_allowed("http://127.0.0.1:9001/agent")
