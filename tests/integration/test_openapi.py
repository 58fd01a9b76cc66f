"""GET /openapi documents every route, built from the same declarations that validate requests
and the models the views answer (tests/unit/test_openapi_document.py checks it in detail)."""

from __future__ import annotations

import json

import app as maof
from chalicelib import openapi
from chalicelib.core.encoding import dumps


def test_openapi_documents_every_route_and_method(api):
    response = api.get("/openapi")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"] == "3.1.0"
    declared = {
        (path, method.lower()) for path, methods in maof.app.routes.items() for method in methods
    }
    documented = {(path, method) for path, ops in document["paths"].items() for method in ops}
    assert documented == declared


def test_request_bodies_are_the_validation_models(api):
    document = api.get("/openapi").json()
    register = document["paths"]["/auth/register"]["post"]
    ref = register["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = document["components"]["schemas"][ref.rsplit("/", 1)[-1]]
    assert set(schema["properties"]) == {"email", "password", "name"}
    assert schema["additionalProperties"] is False
    assert register["security"] == []
    assert "201" in register["responses"]
    execute = document["paths"]["/workflows/execute"]["post"]
    assert execute["security"] == [{"bearerAuth": []}]
    stage = document["components"]["schemas"]["StageDefinition"]
    assert "agentCapability" in stage["properties"]


def test_list_filters_are_documented_query_parameters(api):
    document = api.get("/openapi").json()
    names = {p["name"] for p in document["paths"]["/agents"]["get"]["parameters"]}
    assert names == {"page", "limit", "capability", "status"}


def test_run_control_and_its_headers_are_documented(api):
    document = api.get("/openapi").json()
    execute = document["paths"]["/workflows/execute"]["post"]
    headers = {p["name"] for p in execute["parameters"] if p["in"] == "header"}
    assert headers == {"Idempotency-Key"}
    body = document["components"]["schemas"]["ExecuteRequest"]["properties"]
    assert "callback" in body
    assert "timeoutMs" in document["components"]["schemas"]["WorkflowDefinition"]["properties"]
    for action in ("cancel", "retry"):
        assert "202" in document["paths"][f"/workflows/{{run_id}}/{action}"]["post"]["responses"]
    limited = execute["responses"]["429"]["$ref"].rsplit("/", 1)[-1]
    assert "Retry-After" in document["components"]["responses"][limited]["headers"]
    assert "503" in execute["responses"]
    # /health's own 503 body (degraded) carries Retry-After as every 503 does.
    assert "Retry-After" in document["paths"]["/health"]["get"]["responses"]["503"]["headers"]
    for path in ("/auth/logout", "/auth/logout-all", "/auth/password"):
        assert "post" in document["paths"][path]
    assert "patch" in document["paths"]["/agents/{agent_uuid}"]


def test_the_served_document_is_the_one_built_from_the_declarations(api):
    response = api.get("/openapi")
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == json.loads(dumps(openapi.document(maof.app.endpoints)))
