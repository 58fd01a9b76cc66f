"""GET /openapi documents every route, built from the same declarations that validate requests."""

from __future__ import annotations

import app as maof


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
