"""The OpenAPI document and the response models it is built from, without a server: a valid
OpenAPI 3.1 document; every operation's success body and every error it can answer declared;
the error envelope the one every error path writes; models written exactly as the API always
answered."""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from chalice.test import Client
from openapi_spec_validator import validate as validate_openapi

import app as maof
from chalicelib import openapi
from chalicelib.audit import chain
from chalicelib.core import errors, responses
from chalicelib.core.api import ApiModel
from chalicelib.core.capabilities import check_capability
from chalicelib.core.encoding import dumps
from chalicelib.http import MaofApp, error_body, validate
from maof_client import models as client_models

DOCUMENT = openapi.document(maof.app.endpoints)
SCHEMAS = DOCUMENT["components"]["schemas"]


def operation(path: str, method: str) -> dict[str, Any]:
    return dict(DOCUMENT["paths"][path][method])


def resolve(item: dict[str, Any]) -> dict[str, Any]:
    """A `$ref` to #/components/... followed (once), or the item itself."""
    ref = item.get("$ref")
    if ref is None:
        return item
    _, _, kind, name = ref.split("/")
    return dict(DOCUMENT["components"][kind][name])


def body_schema(response: dict[str, Any]) -> dict[str, Any]:
    return resolve(resolve(response)["content"]["application/json"]["schema"])


def test_the_document_is_valid_openapi_3_1() -> None:
    assert DOCUMENT["openapi"] == "3.1.0"
    validate_openapi(DOCUMENT)


def test_every_success_body_is_the_envelope_of_the_declared_response_model() -> None:
    for spec in maof.app.endpoints:
        success = operation(spec.path, spec.method.lower())["responses"][str(spec.status)]
        schema = body_schema(success)
        if spec.raw:
            assert schema["title"] == spec.response.__name__
            continue
        assert schema["required"] == ["success", "data"]
        assert schema["properties"]["success"] == {"const": True}
        data = schema["properties"]["data"]["$ref"]
        assert data == f"#/components/schemas/{spec.response.__name__}", spec.name


def test_a_response_model_is_defined_once_and_referenced_everywhere() -> None:
    agent_ops = [
        ("/agents/register", "post"),
        ("/agents/{agent_uuid}", "get"),
        ("/agents/{agent_uuid}", "patch"),
        ("/agents/{agent_uuid}/health-check", "post"),
    ]
    for path, method in agent_ops:
        success = next(iter(operation(path, method)["responses"].values()))
        assert success["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/AgentEnvelope"
        }
    listed = SCHEMAS["AgentList"]["properties"]["agents"]["items"]
    assert listed == {"$ref": "#/components/schemas/Agent"}
    text = json.dumps(DOCUMENT)
    for ref in {part.split('"')[0] for part in text.split('"$ref": "')[1:]}:
        _, _, kind, name = ref.split("/")
        assert name in DOCUMENT["components"][kind], ref


EXPECTED_ERRORS = {
    ("/health", "get"): [400, 415, 500, 503],
    ("/openapi", "get"): [400, 415, 500],
    ("/auth/register", "post"): [400, 409, 413, 415, 429, 500, 503],
    ("/auth/login", "post"): [400, 401, 413, 415, 429, 500, 503],
    ("/auth/refresh", "post"): [400, 401, 413, 415, 500, 503],
    ("/auth/logout", "post"): [400, 413, 415, 500, 503],
    ("/auth/logout-all", "post"): [400, 401, 415, 500, 503],
    ("/auth/password", "post"): [400, 401, 413, 415, 429, 500, 503],
    ("/auth/me", "get"): [400, 401, 415, 500, 503],
    ("/agents/register", "post"): [400, 401, 403, 409, 413, 415, 429, 500, 503],
    ("/agents", "get"): [400, 401, 415, 500, 503],
    ("/agents/{agent_uuid}", "get"): [400, 401, 404, 415, 500, 503],
    ("/agents/{agent_uuid}", "patch"): [400, 401, 403, 404, 413, 415, 500, 503],
    ("/agents/{agent_uuid}", "delete"): [400, 401, 403, 404, 415, 500, 503],
    ("/agents/{agent_uuid}/health-check", "post"): [400, 401, 403, 404, 415, 429, 500, 503],
    ("/workflows/execute", "post"): [400, 401, 409, 413, 415, 429, 500, 503],
    ("/workflows", "get"): [400, 401, 415, 500, 503],
    ("/workflows/{run_id}", "get"): [400, 401, 404, 415, 500, 503],
    ("/workflows/{run_id}/result", "get"): [400, 401, 404, 415, 500, 503],
    ("/workflows/{run_id}/cancel", "post"): [400, 401, 404, 409, 415, 500, 503],
    ("/workflows/{run_id}/retry", "post"): [400, 401, 404, 409, 415, 429, 500, 503],
    ("/workflows/{run_id}/audit", "get"): [400, 401, 404, 415, 500, 503],
    ("/workflows/{run_id}/audit/export", "get"): [400, 401, 404, 415, 500, 503],
    ("/audit/keys", "get"): [400, 415, 500, 503],
    ("/audit/checkpoints/latest", "get"): [400, 404, 415, 500, 503],
    ("/stats", "get"): [400, 401, 415, 500, 503],
}


def test_every_operation_documents_every_error_it_can_answer() -> None:
    documented = {
        (path, method): sorted(int(s) for s in op["responses"] if not s.startswith("2"))
        for path, ops in DOCUMENT["paths"].items()
        for method, op in ops.items()
    }
    assert documented == EXPECTED_ERRORS


def test_errors_share_the_error_envelope_and_waiting_ones_say_how_long() -> None:
    for path, ops in DOCUMENT["paths"].items():
        for method, op in ops.items():
            for status, response in op["responses"].items():
                if status.startswith("2") or (path, status) == ("/health", "503"):
                    continue
                assert body_schema(response)["title"] == "ErrorEnvelope", (path, method, status)
                headers = resolve(response)["headers"]
                assert "X-Request-Id" in headers
                assert ("Retry-After" in headers) == (status in ("429", "503"))
    details = SCHEMAS["ErrorBody"]["properties"]["details"]["anyOf"]
    assert {"items": {"$ref": "#/components/schemas/FieldError"}, "type": "array"} in details
    assert SCHEMAS["FieldError"]["required"] == ["field", "message"]


def test_health_documents_its_degraded_answer_with_data() -> None:
    degraded = body_schema(operation("/health", "get")["responses"]["503"])
    assert degraded["title"] == "HealthDegraded"
    assert set(degraded["required"]) == {"success", "data", "error"}


def test_idempotency_key_and_bearer_auth_are_documented() -> None:
    execute = operation("/workflows/execute", "post")
    headers = [p["name"] for p in execute["parameters"] if p["in"] == "header"]
    assert headers == ["Idempotency-Key"]
    assert execute["security"] == [{"bearerAuth": []}]
    assert operation("/auth/login", "post")["security"] == []


# ------------------------------------------------------------------ the error envelope


class Body(ApiModel):
    name: str


def raised_by_validation() -> errors.ApiError:
    with pytest.raises(errors.ValidationError) as caught:
        validate(Body, {"colour": "red"})
    return caught.value


@pytest.mark.parametrize(
    "error",
    [
        raised_by_validation(),
        errors.BadRequest("Request body is not valid JSON"),
        errors.Unauthorized("Invalid token"),
        errors.Conflict("taken", [{"field": "email", "message": "already registered"}]),
        errors.RateLimited("slow down", 2.5),
        errors.ServiceUnavailable("The database is unavailable"),
        errors.InternalError("An internal error occurred"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_every_error_path_writes_the_documented_error_envelope(error: errors.ApiError) -> None:
    written = json.loads(dumps(error_body(error, "req-1")))
    parsed = responses.ErrorEnvelope.model_validate(written)
    assert responses.plain(parsed) == written


# ------------------------------------------------------------------ models as written

OWNER = uuid.uuid4()
WHEN = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)


def agent(**fields: Any) -> responses.Agent:
    return responses.Agent(
        agent_uuid=uuid.UUID(int=1),
        agent_id="summarizer",
        name="Summarizer",
        description=None,
        capabilities=["summarization"],
        max_concurrent_tasks=5,
        status="online",
        visibility="shared",
        last_health_check=None,
        created_at=WHEN,
        updated_at=WHEN,
        **fields,
    )


def test_a_model_is_written_with_camel_case_keys_and_the_usual_datetimes() -> None:
    written = json.loads(dumps(responses.plain(agent(endpoint="http://a", owner_user_uuid=OWNER))))
    assert written["agentUuid"] == str(uuid.UUID(int=1))
    assert written["ownerUserUuid"] == str(OWNER)
    assert written["createdAt"] == "2026-01-02T03:04:05.000006+00:00"
    assert written["description"] is None  # nullable fields are always there
    assert list(written) == [
        "agentUuid",
        "agentId",
        "name",
        "description",
        "endpoint",
        "capabilities",
        "maxConcurrentTasks",
        "status",
        "visibility",
        "lastHealthCheck",
        "ownerUserUuid",
        "createdAt",
        "updatedAt",
    ]


def test_an_absent_field_is_left_out_not_null() -> None:
    written = responses.plain(agent())
    assert "endpoint" not in written and "ownerUserUuid" not in written
    assert "endpoint" not in SCHEMAS["Agent"]["required"]
    assert SCHEMAS["Agent"]["properties"]["endpoint"] == {"title": "Endpoint", "type": "string"}


def test_an_audit_entry_is_served_exactly_as_it_was_hashed() -> None:
    entry = chain.next_entry(uuid.uuid4(), None, None, "submit", "queued", details={"n": 1.5})
    view = chain.entry_view(entry)
    served = responses.plain(responses.AuditEntry.model_validate(view))
    assert served == view
    assert chain.rules.object_hash(served) == entry.entry_hash
    extended = {**view, "futureMember": [1, 2]}  # a member a later version may add
    assert responses.plain(responses.AuditEntry.model_validate(extended)) == extended


def test_a_view_must_answer_its_declared_model() -> None:
    test_app = MaofApp("contract")

    @test_app.endpoint("/right", "GET", public=True, response=responses.SessionsEnded, summary="")
    def right(request: Any) -> responses.SessionsEnded:
        return responses.SessionsEnded(sessions_ended=1)

    @test_app.endpoint("/wrong", "GET", public=True, response=responses.SessionsEnded, summary="")
    def wrong(request: Any) -> dict[str, Any]:
        return {"sessionsEnded": 1}

    with Client(test_app) as client:
        assert client.http.get("/right").json_body == {
            "success": True,
            "data": {"sessionsEnded": 1},
        }
        refused = client.http.get("/wrong")
    assert refused.status_code == 500
    assert refused.json_body["error"]["code"] == "INTERNAL_ERROR"


# ------------------------------------------------------------------ the client reads them

CLIENT_VIEWS = [
    (client_models.User, responses.User),
    (client_models.Agent, responses.Agent),
    (client_models.PageMeta, responses.PageMeta),
    (client_models.Submission, responses.Submitted),
    (client_models.Progress, responses.Progress),
    (client_models.Stage, responses.Stage),
    (client_models.CallbackStatus, responses.CallbackStatus),
    (client_models.RunSummary, responses.ListedRun),
    (client_models.Run, responses.Run),
    (client_models.RunResult, responses.RunResult),
    (client_models.AuditChain, responses.ChainReport),
    (client_models.AuditTrail, responses.AuditTrail),
    (client_models.Health, responses.Health),
]


@pytest.mark.parametrize(("view", "model"), CLIENT_VIEWS, ids=lambda item: item.__name__)
def test_the_client_reads_only_fields_the_api_answers(view: type, model: type) -> None:
    # maof_client mirrors the answers in dataclasses of its own (it needs no pydantic).
    read = {item.name for item in dataclasses.fields(view)} - {"raw"}
    assert read <= set(model.model_fields), read - set(model.model_fields)


def test_the_clients_audit_entry_reads_the_served_entry() -> None:
    entry = chain.next_entry(uuid.uuid4(), None, None, "submit", "queued")
    served = responses.plain(responses.AuditEntry.model_validate(chain.entry_view(entry)))
    read = client_models.AuditEntry.from_api(served)
    assert (read.seq, read.prev_hash, read.entry_hash) == (1, chain.GENESIS, entry.entry_hash)


@pytest.mark.parametrize(
    "tag", ["summarization", "code-audit.python", "a1", "", "Upper", "a--b", "-a", "a.", "x" * 101]
)
def test_the_documented_capability_rule_is_the_one_enforced(tag: str) -> None:
    documented = SCHEMAS["StageDefinition"]["properties"]["agentCapability"]
    follows = len(tag) <= documented["maxLength"] and re.search(documented["pattern"], tag)
    try:
        check_capability(tag)
        enforced = True
    except ValueError:
        enforced = False
    assert bool(follows) == enforced
