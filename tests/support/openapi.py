"""An answer of the API checked against /openapi: its operation documents its status, it is
JSON, and its body and headers are what the document says for that status. The integration
tests' `Api` client checks every answer it gets, so a body no test has seen described (a
new field, a missing one, an undocumented error) fails the test that met it."""

from __future__ import annotations

import functools
from typing import Any
from urllib.parse import unquote, urlsplit

import requests
import schemathesis
from schemathesis.schemas import BaseSchema
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

# What schemathesis checks against the running API (test_openapi_conformance.py) too, bar
# its "no 5xx" check: the tests that provoke a 500 on purpose see a documented one.
CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


@functools.cache
def api_schema() -> BaseSchema:
    """The document GET /openapi serves, loaded by schemathesis (once per test session)."""
    import app as maof
    from chalicelib import openapi

    return schemathesis.openapi.from_dict(
        openapi.document(maof.app.endpoints), config=schemathesis.Config()
    )


def check_answer(response: requests.Response) -> None:
    """Fail unless `response` is what the document says its operation answers. Requests
    to no documented operation (an unknown route, an unrouted method) are not checked."""
    request = response.request
    assert request.method is not None and request.url is not None
    path = unquote(urlsplit(request.url).path)
    operation = api_schema().find_operation_by_path(request.method, path)
    if operation is None:
        return
    case = operation.Case(method=request.method, path_parameters=_path_parameters(operation, path))
    case.validate_response(response, checks=CHECKS)


def _path_parameters(operation: Any, path: str) -> dict[str, str]:
    template = operation.path.strip("/").split("/")
    actual = path.strip("/").split("/")
    return {
        name[1:-1]: value
        for name, value in zip(template, actual, strict=False)
        if name.startswith("{")
    }
