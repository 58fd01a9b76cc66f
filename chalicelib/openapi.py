"""The OpenAPI 3.1 document, built from the endpoints' own declarations (never by hand): the
request and response models, and every error status each operation can answer."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from chalicelib import __version__
from chalicelib.core import responses
from chalicelib.http import EndpointSpec

REF = "#/components/schemas/{model}"

# Each error status: its component under #/components/responses, and what it means.
ERRORS: dict[int, tuple[str, str]] = {
    400: (
        "BadRequest",
        "VALIDATION_ERROR, with `details: [{field, message}]` naming every field refused "
        "(dotted camelCase paths; unknown fields too, and on every route unknown query "
        "parameters); or BAD_REQUEST (a missing or malformed JSON body)",
    ),
    401: ("Unauthorized", "UNAUTHORIZED: no, expired, revoked or invalid credentials"),
    403: ("Forbidden", "FORBIDDEN: the caller may not do this (e.g. not the agent's owner)"),
    404: ("NotFound", "NOT_FOUND: unknown, or not the caller's to see"),
    409: ("Conflict", "CONFLICT: already exists, or not in a state that allows it"),
    413: ("PayloadTooLarge", "PAYLOAD_TOO_LARGE: a body over MAOF_MAX_BODY_BYTES"),
    415: (
        "UnsupportedMediaType",
        "UNSUPPORTED_MEDIA_TYPE: a Content-Type other than application/json",
    ),
    429: (
        "RateLimited",
        "RATE_LIMITED: try again after Retry-After seconds (also `details.retryAfterSeconds`)",
    ),
    500: ("InternalError", "INTERNAL_ERROR: never with a stack trace; the requestId is logged"),
    503: (
        "ServiceUnavailable",
        "SERVICE_UNAVAILABLE: a dependency (Postgres, Redis, S3) is down; try again after "
        "Retry-After seconds",
    ),
}
WAIT_STATUSES = (429, 503)  # answered with a Retry-After header

HEADERS = {
    "RequestId": {
        "description": "This request's id, also in error bodies and the service's logs",
        "required": True,
        "schema": {"type": "string"},
    },
    "RetryAfter": {
        "description": "Seconds to wait before trying again",
        "required": True,
        "schema": {"type": "integer", "minimum": 1},
    },
}
RESPONSE_HEADERS = {"X-Request-Id": {"$ref": "#/components/headers/RequestId"}}


def error_statuses(spec: EndpointSpec) -> list[int]:
    """Every error status an operation can answer: those of every route, those its
    declarations imply, and those its view raises itself (`raises`)."""
    statuses = {400, 415, 500}  # any route: an unknown query parameter; a non-JSON
    # Content-Type; a bug
    if not spec.raw:
        statuses.add(503)  # Postgres (or Redis, S3) away
    if spec.body is not None:
        statuses.add(413)
    if not spec.public:
        statuses.add(401)
    if "{" in spec.path:
        statuses.add(404)  # an unknown (or someone else's) id
    statuses.update(spec.raises)
    statuses.update(status for status, _ in spec.error_bodies)
    return sorted(statuses)


def _success(spec: EndpointSpec, ref: dict[str, str], schemas: dict[str, Any]) -> dict[str, Any]:
    name = ref["$ref"].rsplit("/", 1)[-1]
    if spec.raw:
        return {
            "description": f"Success: {name} (no envelope)",
            "headers": RESPONSE_HEADERS,
            "content": {"application/json": {"schema": ref}},
        }
    envelope = f"{name}Envelope"
    schemas[envelope] = {
        "title": envelope,
        "type": "object",
        "required": ["success", "data"],
        "additionalProperties": False,
        "properties": {"success": {"const": True}, "data": ref},
    }
    return {
        "description": f"Success: {{success: true, data: {name}}}",
        "headers": RESPONSE_HEADERS,
        "content": {"application/json": {"schema": {"$ref": REF.format(model=envelope)}}},
    }


# Each model (and how it is read: "validation", or written: "serialization") -> its $ref.
Refs = Mapping[tuple[Any, JsonSchemaMode], dict[str, Any]]


def _operation(spec: EndpointSpec, refs: Refs, schemas: dict[str, Any]) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in re.findall(r"{(\w+)}", spec.path)
    ]
    parameters += [
        {
            "name": name,
            "in": "header",
            "required": False,
            "description": text,
            "schema": {"type": "string"},
        }
        for name, text in spec.headers
    ]
    if spec.query is not None:
        query_schema = spec.query.model_json_schema(by_alias=True, ref_template=REF)
        required = set(query_schema.get("required", []))
        for name, prop in query_schema.get("properties", {}).items():
            parameters.append(
                {"name": name, "in": "query", "required": name in required, "schema": prop}
            )
    own_bodies = dict(spec.error_bodies)
    answers: dict[str, Any] = {
        str(spec.status): _success(spec, refs[(spec.response, "serialization")], schemas)
    }
    for status in error_statuses(spec):
        if status in own_bodies:
            answers[str(status)] = {
                "description": (own_bodies[status].__doc__ or ERRORS[status][1]).strip(),
                "headers": _error_headers(status),
                "content": {
                    "application/json": {"schema": refs[(own_bodies[status], "serialization")]}
                },
            }
        else:
            answers[str(status)] = {"$ref": f"#/components/responses/{ERRORS[status][0]}"}
    operation: dict[str, Any] = {
        "operationId": spec.name,
        "summary": spec.summary,
        "tags": [spec.path.strip("/").split("/")[0]],
        "parameters": parameters,
        "security": [] if spec.public else [{"bearerAuth": []}],
        "responses": answers,
    }
    if spec.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[(spec.body, "validation")]}},
        }
    return operation


def _error_headers(status: int) -> dict[str, Any]:
    headers: dict[str, Any] = dict(RESPONSE_HEADERS)
    if status in WAIT_STATUSES:
        headers["Retry-After"] = {"$ref": "#/components/headers/RetryAfter"}
    return headers


def _error_response(status: int) -> dict[str, Any]:
    return {
        "description": ERRORS[status][1],
        "headers": _error_headers(status),
        "content": {"application/json": {"schema": {"$ref": REF.format(model="ErrorEnvelope")}}},
    }


def _models(endpoints: tuple[EndpointSpec, ...]) -> list[tuple[type[BaseModel], JsonSchemaMode]]:
    """Every model the document names: request bodies as validated, responses as written."""
    found: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {
        (responses.ErrorEnvelope, "serialization"): None
    }
    for spec in endpoints:
        if spec.body is not None:
            found[(spec.body, "validation")] = None
        found[(spec.response, "serialization")] = None
        for _, model in spec.error_bodies:
            found[(model, "serialization")] = None
    return list(found)


def document(endpoints: list[EndpointSpec]) -> dict[str, Any]:
    return _cached(tuple(endpoints))


@functools.lru_cache(maxsize=1)
def _cached(endpoints: tuple[EndpointSpec, ...]) -> dict[str, Any]:
    # One pass over every model: each is defined once under components, and two models of
    # the same name (or one model read and written differently) get names of their own.
    refs, definitions = models_json_schema(_models(endpoints), by_alias=True, ref_template=REF)
    schemas: dict[str, Any] = dict(definitions.get("$defs", {}))
    paths: dict[str, dict[str, Any]] = {}
    used: set[int] = set()
    for spec in endpoints:
        paths.setdefault(spec.path, {})[spec.method.lower()] = _operation(spec, refs, schemas)
        used.update(error_statuses(spec))
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "MAOF — Multi-Agent Orchestration Framework",
            "version": __version__,
            "description": "Every answer is an envelope: {success: true, data} or "
            "{success: false, error: {code, message, details?, requestId}}. Every response "
            "carries X-Request-Id; 429 and 503 carry Retry-After.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": {ERRORS[status][0]: _error_response(status) for status in sorted(used)},
            "headers": HEADERS,
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }
