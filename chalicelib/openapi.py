"""The OpenAPI 3.1 document, built from the endpoints' own declarations (never by hand)."""

from __future__ import annotations

import functools
import re
from typing import Any

from pydantic import BaseModel

from chalicelib import __version__
from chalicelib.http import EndpointSpec

REF = "#/components/schemas/{model}"

ERROR_CODES = {
    400: "Bad request: VALIDATION_ERROR (with details) or BAD_REQUEST",
    401: "UNAUTHORIZED: no, expired or invalid access token",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    429: "RATE_LIMITED: try again after Retry-After seconds (also details.retryAfterSeconds)",
    500: "INTERNAL_ERROR (never with a stack trace; see requestId)",
    503: "SERVICE_UNAVAILABLE: a dependency is down (e.g. sign-in without Redis)",
}

ENVELOPE_ERROR = {
    "type": "object",
    "required": ["success", "error"],
    "properties": {
        "success": {"const": False},
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "details": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                    },
                },
                "requestId": {"type": "string"},
            },
        },
    },
}


def _schema(model: type[BaseModel], schemas: dict[str, Any]) -> dict[str, str]:
    """Register `model` (and what it refers to) under components; return a $ref to it."""
    found = model.model_json_schema(by_alias=True, ref_template=REF)
    for name, definition in found.pop("$defs", {}).items():
        schemas[name] = definition
    schemas[model.__name__] = found
    return {"$ref": REF.format(model=model.__name__)}


def _operation(spec: EndpointSpec, schemas: dict[str, Any]) -> dict[str, Any]:
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
        for name, prop in query_schema.get("properties", {}).items():
            parameters.append({"name": name, "in": "query", "required": False, "schema": prop})
    operation: dict[str, Any] = {
        "operationId": spec.name,
        "summary": spec.summary,
        "tags": [spec.path.strip("/").split("/")[0]],
        "parameters": parameters,
        "security": [] if spec.public else [{"bearerAuth": []}],
        "responses": {
            str(spec.status): {
                "description": "Success: {success: true, data}",
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
            **{
                str(code): {
                    "description": text,
                    "content": {
                        "application/json": {"schema": {"$ref": REF.format(model="Error")}}
                    },
                }
                for code, text in ERROR_CODES.items()
                if code != 401 or not spec.public
            },
        },
    }
    operation["responses"]["429"]["headers"] = {
        "Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}
    }
    if spec.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _schema(spec.body, schemas)}},
        }
    return operation


def document(endpoints: list[EndpointSpec]) -> dict[str, Any]:
    return _cached(tuple(endpoints))


@functools.lru_cache(maxsize=1)
def _cached(endpoints: tuple[EndpointSpec, ...]) -> dict[str, Any]:
    schemas: dict[str, Any] = {"Error": ENVELOPE_ERROR}
    paths: dict[str, dict[str, Any]] = {}
    for spec in endpoints:
        paths.setdefault(spec.path, {})[spec.method.lower()] = _operation(spec, schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "MAOF — Multi-Agent Orchestration Framework",
            "version": __version__,
            "description": "Every answer is an envelope: {success: true, data} or "
            "{success: false, error: {code, message, details?, requestId}}.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }
