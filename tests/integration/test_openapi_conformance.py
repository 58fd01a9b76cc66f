"""Schemathesis against the running API: every operation /openapi documents gets generated
requests, valid and invalid (bodies, query strings, path ids, headers, no or a bad token,
other methods and media types), as a signed-in user of its own, and every answer must be
what the document says: never a 5xx, a documented status, JSON, the documented body and
headers.

Repeatable: a fixed seed and derandomized generation give the same requests on every run.
The budget is small so `make test` stays quick (about 30 s); MAOF_FUZZ_EXAMPLES (examples
per operation, default 25) and MAOF_FUZZ_SEED widen it when hunting, e.g.
`MAOF_FUZZ_EXAMPLES=300 MAOF_FUZZ_SEED=7 pytest tests/integration/test_openapi_conformance.py`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

import app as maof
from chalicelib import openapi
from chalicelib.agents import network
from tests.integration.conftest import Api
from tests.support.openapi import CHECKS

CONFIG = schemathesis.Config.from_dict(
    {
        "seed": int(os.environ.get("MAOF_FUZZ_SEED", "14")),
        "generation": {
            "max-examples": int(os.environ.get("MAOF_FUZZ_EXAMPLES", "25")),
            "deterministic": True,
            "mode": "all",  # valid requests, and invalid ones the API must refuse with a 4xx
        },
    }
)
schema = schemathesis.openapi.from_dict(openapi.document(maof.app.endpoints), config=CONFIG)


@pytest.fixture
def signed_in(api_url: str, sent: Any) -> Iterator[Api]:
    """A new user for each operation (one operation's sign-out or password change must not
    end another's session); the runs it submitted are cancelled afterwards."""
    client = Api(api_url).as_new_user()
    yield client
    for status in ("queued", "in_progress"):
        listed = client.get("/workflows", params={"status": status, "limit": 100}).json()
        for run in listed.get("data", {}).get("runs", []):
            client.post(f"/workflows/{run['workflowRunId']}/cancel")


@pytest.fixture(autouse=True)
def nothing_leaves_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Generated agent endpoints and callback URLs may name any host: the SSRF guard refuses
    them all here (a 400, as it would for a private address), so none is ever called."""

    def refuse(url: str, deadline: float | None = None) -> network.Target:
        raise network.EndpointNotAllowed(network.PUBLIC_ONLY)

    monkeypatch.setattr(network, "resolve_and_check", refuse)


@schema.parametrize()
@settings(
    deadline=None,
    database=None,  # no examples replayed from earlier runs: every run is the same
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_every_answer_is_what_the_document_says(case: Any, signed_in: Api) -> None:
    case.call_and_validate(
        base_url=signed_in.base_url,
        headers={"Authorization": f"Bearer {signed_in.token}"},
        checks=[not_a_server_error, *CHECKS],
        timeout=10,
    )
