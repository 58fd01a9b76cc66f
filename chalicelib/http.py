"""HTTP plumbing: the response envelope, one error path, request parsing and validation."""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import pydantic
from chalice.app import Chalice, ChaliceUnhandledError, CORSConfig, Request, Response
from pydantic import BaseModel

from chalicelib.auth.sessions import authenticate
from chalicelib.config import get_settings, import_time_setting
from chalicelib.core import errors, responses
from chalicelib.core.api import ApiModel, Principal, Reply
from chalicelib.core.encoding import dumps
from chalicelib.db import is_unavailable
from chalicelib.logs import logger

M = TypeVar("M", bound=BaseModel)

EXPOSED_HEADERS = ["X-Request-Id", "Retry-After"]


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity: Python's extension, not RFC 8259


def json_depth(value: Any) -> int:
    """How deeply containers nest in a parsed JSON value (a scalar is 0), without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def json_response(body: Any, status: int, request_id: str) -> Response:
    return Response(
        body=dumps(body),
        status_code=status,
        headers={"Content-Type": "application/json", "X-Request-Id": request_id},
    )


def error_body(error: errors.ApiError, request_id: str) -> dict[str, Any]:
    detail: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.details is not None:
        detail["details"] = error.details
    detail["requestId"] = request_id
    return {"success": False, "error": detail}


def validation_details(exc: pydantic.ValidationError, source: str = "body") -> list[dict[str, str]]:
    """Pydantic errors as `[{field, message}]` with dotted camelCase paths; an error of the
    whole input is named by its `source` ("body", "query"), a key by itself (`""` too)."""
    details = []
    for item in exc.errors(include_url=False, include_input=False):
        loc = [str(part) for part in item["loc"]]
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        elif item["type"] == "missing":
            message = "is required"
        elif item["type"] == "value_error":
            message = str(item["msg"]).removeprefix("Value error, ")  # our validators' words
        else:
            message = item["msg"]
        details.append({"field": ".".join(loc) if loc else source, "message": message})
    return details


def validate(model: type[M], data: Any, source: str = "body") -> M:
    """Validate `data` (read from the request's `source`) against `model`, raising
    VALIDATION_ERROR with field details."""
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        details = validation_details(exc, source)
        fields = ", ".join(d["field"] for d in details[:5])
        raise errors.ValidationError(f"Invalid request: {fields}", details) from None


class ApiRequest:
    """What a view needs from the HTTP request, parsed on demand."""

    def __init__(self, request: Request, principal: Principal | None, request_id: str):
        self._request = request
        self.principal = principal
        self.request_id = request_id

    @property
    def user(self) -> Principal:
        if self.principal is None:
            raise errors.Unauthorized("Authentication required")
        return self.principal

    def body(self, model: type[M]) -> M:
        raw = self._request.raw_body or b""
        if len(raw) > get_settings().max_body_bytes:
            raise errors.PayloadTooLarge(
                f"Request body exceeds {get_settings().max_body_bytes} bytes"
            )
        if not raw.strip():
            raise errors.BadRequest("Request body is required")
        limit = get_settings().max_json_depth
        try:
            # UTF-8 alone (RFC 8259 8.1), its BOM tolerated: json.loads of bytes would also
            # take UTF-16 and UTF-32.
            text = raw.decode("utf-8-sig") if isinstance(raw, bytes) else raw
            data = json.loads(text, parse_constant=_not_json)
            too_deep = json_depth(data) > limit
        except (ValueError, UnicodeDecodeError):
            raise errors.BadRequest("Request body is not valid JSON") from None
        except RecursionError:
            too_deep = True  # deeper than Python's own parser goes
        if too_deep:
            raise errors.ValidationError(
                f"Request body is nested more than {limit} levels deep",
                [{"field": "body", "message": f"must not nest more than {limit} levels"}],
            )
        if not isinstance(data, dict):
            raise errors.ValidationError(
                "Request body must be a JSON object",
                [{"field": "body", "message": "must be a JSON object"}],
            )
        return validate(model, data)

    def query(self, model: type[M]) -> M:
        params = dict(self._request.query_params or {})
        return validate(model, params, "query")

    @property
    def source_ip(self) -> str | None:
        """The client's address as API Gateway (or `chalice local`) saw it."""
        context = getattr(self._request, "context", None) or {}
        identity = context.get("identity") or {}
        address = identity.get("sourceIp")
        return str(address) if address else None

    def header(self, name: str) -> str | None:
        value = self._request.headers.get(name)
        return str(value) if value is not None else None


class _NoQuery(ApiModel):
    """The query string of a route that reads none: each parameter is an unknown field."""


View = Callable[..., Any]


@dataclass(frozen=True)
class EndpointSpec:
    """What an endpoint takes and answers; the OpenAPI document is built from these."""

    path: str
    method: str
    name: str
    summary: str
    public: bool
    body: type[BaseModel] | None
    query: type[BaseModel] | None
    status: int
    response: type[BaseModel]  # the success body: its `data`, or all of it when raw
    raw: bool = False
    headers: tuple[tuple[str, str], ...] = ()  # optional request headers it reads: (name, what)
    raises: tuple[int, ...] = ()  # error statuses of its own, besides those every route has
    error_bodies: tuple[tuple[int, type[BaseModel]], ...] = ()  # not the error envelope


class MaofApp(Chalice):
    """Chalice with MAOF's envelope, error path, validation and authentication on every route."""

    def __init__(self, app_name: str) -> None:
        # The app's logger is logging.getLogger(app_name), the same one chalicelib.logs
        # configures; left to Chalice it may get a second, plain-text handler and level ERROR.
        super().__init__(app_name=app_name, configure_logs=False)
        self.register_middleware(self._envelope_errors, "http")
        self.endpoints: list[EndpointSpec] = []

    def endpoint(
        self,
        path: str,
        method: str,
        *,
        summary: str,
        response: type[BaseModel],
        public: bool = False,
        body: type[BaseModel] | None = None,
        query: type[BaseModel] | None = None,
        status: int = 200,
        raw: bool = False,
        headers: dict[str, str] | None = None,
        raises: tuple[int, ...] = (),
        error_bodies: dict[int, type[BaseModel]] | None = None,
        admission: Callable[[ApiRequest], AbstractContextManager[None]] | None = None,
    ) -> Callable[[View], View]:
        """Register `view(request, **path_params)` at `path`.

        The declared `body` and `query` models are validated before the view runs and passed
        to it as `body=` and `query=`; `admission(request)`, if given, is entered before the
        body is read and left once it is, or with its refusal: a limit that must hold before
        reading a body costs anything (a rate's 429). The view answers a `response` model
        (answered with `status`), or a Reply of one; `raw` answers without the envelope.
        The same declarations, with the error statuses the view raises itself (`raises`;
        those every route has are added by chalicelib.openapi) make the OpenAPI document,
        so the two cannot drift.
        """
        cors = CORSConfig(
            allow_origin=cors_origin(),
            allow_headers=["Authorization", "Content-Type", "X-Request-Id", "Idempotency-Key"],
            expose_headers=EXPOSED_HEADERS,
            max_age=600,
        )

        def register(view: View) -> View:
            @functools.wraps(view)
            def handler(**path_params: str) -> Response:
                request = self.current_request
                assert request is not None
                request_id = _request_id(request)
                _check_json_content_type(request.headers.get("content-type"))
                try:
                    # Inside: checking the token reads the session from the database.
                    token = request.headers.get("authorization")
                    principal = None if public else authenticate(token)
                    api_request = ApiRequest(request, principal, request_id)
                    arguments: dict[str, Any] = dict(path_params)
                    if body is not None:
                        with admission(api_request) if admission else nullcontext():
                            arguments["body"] = api_request.body(body)
                    if query is not None:
                        arguments["query"] = api_request.query(query)
                    else:
                        api_request.query(_NoQuery)  # any parameter is unknown: a 400
                    result = view(api_request, **arguments)
                except errors.ApiError:
                    raise
                except Exception as exc:
                    if is_unavailable(exc):
                        # The database is away (restarting, unreachable, a read-only node
                        # after a failover): nothing was stored by this request's statement,
                        # and trying again shortly is the answer.
                        logger.exception(
                            "database unavailable", extra={"requestId": request_id, "path": path}
                        )
                        raise errors.ServiceUnavailable(
                            "The database is unavailable; try again shortly"
                        ) from None
                    logger.exception(
                        "unhandled error", extra={"requestId": request_id, "path": path}
                    )
                    raise errors.InternalError("An internal error occurred") from None
                if raw:
                    return json_response(responses.plain(result), status, request_id)
                reply = result if isinstance(result, Reply) else Reply(result, status)
                if not isinstance(reply.data, response):
                    raise TypeError(f"{view.__name__} answered {type(reply.data).__name__}")
                envelope = {"success": reply.error is None, "data": responses.plain(reply.data)}
                if reply.error is not None:
                    envelope["error"] = error_body(reply.error, request_id)["error"]
                answer = json_response(envelope, reply.status, request_id)
                if reply.error is not None:  # a 503's Retry-After, as when raised
                    answer.headers.update(reply.error.headers)
                return answer

            self.route(path, methods=[method], cors=cors, content_types=["application/json"])(
                _past_chalice(handler)
            )
            self.endpoints.append(
                EndpointSpec(
                    path,
                    method,
                    view.__name__,
                    summary,
                    public,
                    body,
                    query,
                    status,
                    response,
                    raw,
                    headers=tuple((headers or {}).items()),
                    raises=raises,
                    error_bodies=tuple((error_bodies or {}).items()),
                )
            )
            return view

        return register

    def _envelope_errors(
        self, event: Request, get_response: Callable[[Request], Response]
    ) -> Response:
        request_id = _request_id(event)
        try:
            response = get_response(event)
        except _InTransit as transit:
            exc = transit.error
            response = json_response(error_body(exc, request_id), exc.status, request_id)
            response.headers.update(exc.headers)
        except Exception:
            logger.exception(
                "unhandled error", extra={"requestId": request_id, "path": _path(event)}
            )
            internal = errors.InternalError("An internal error occurred")
            response = json_response(error_body(internal, request_id), internal.status, request_id)
        response = _envelope_chalice_error(response, request_id)
        response.headers.setdefault("X-Request-Id", request_id)
        response.headers.setdefault("Access-Control-Allow-Origin", cors_origin())
        response.headers.setdefault("Access-Control-Expose-Headers", ",".join(EXPOSED_HEADERS))
        return response


class _InTransit(ChaliceUnhandledError):
    """An ApiError on its way from a view to _envelope_errors: Chalice lets only its own
    ChaliceUnhandledError through to the middleware (any other exception of a view it
    answers itself, as a bare 500)."""

    def __init__(self, error: errors.ApiError) -> None:
        super().__init__(error.message)
        self.error = error


def _past_chalice(handler: Callable[..., Response]) -> Callable[..., Response]:
    @functools.wraps(handler)
    def carried(**path_params: str) -> Response:
        try:
            return handler(**path_params)
        except errors.ApiError as exc:
            raise _InTransit(exc) from exc

    return carried


# Chalice answers some failures itself, before or around our views; give them our envelope.
_CHALICE_ERRORS: dict[str, type[errors.ApiError]] = {
    "MethodNotAllowedError": errors.MethodNotAllowed,
    "UnsupportedMediaType": errors.UnsupportedMediaType,
    "BadRequestError": errors.BadRequest,
    "BadRequest": errors.BadRequest,
    "NotFoundError": errors.NotFound,
    "InternalServerError": errors.InternalError,
}


def _envelope_chalice_error(response: Response, request_id: str) -> Response:
    body = response.body
    if not (isinstance(body, dict) and set(body) == {"Code", "Message"}):
        return response
    kind = _CHALICE_ERRORS.get(str(body["Code"]), errors.InternalError)
    message = (
        str(body["Message"]) if kind is not errors.InternalError else "An internal error occurred"
    )
    error = kind(message)
    enveloped = json_response(error_body(error, request_id), response.status_code, request_id)
    for name, value in response.headers.items():
        enveloped.headers.setdefault(name, value)
    return enveloped


def _check_json_content_type(content_type: str | None) -> None:
    """A request's Content-Type is application/json (parameters aside) or absent.

    Chalice's own check (`content_types=`) takes a header naming application/json anywhere
    in it, or `*/*`: `text/plain;application/json`, which a browser sends cross-origin
    without asking first, would be read as JSON."""
    if content_type is None:
        return
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        raise errors.UnsupportedMediaType(f"Unsupported media type: {content_type}")


def cors_origin() -> str:
    """The dashboard origin allowed by CORS. Read from the environment, not the validated
    settings, because routes are declared at import time (also when `chalice package`
    imports the app, where no secrets exist)."""
    return import_time_setting("cors_origin")


def _request_id(request: Request | None) -> str:
    context = getattr(request, "context", None) or {}
    cached = context.get("maofRequestId")
    if cached:
        return str(cached)
    request_id = str(context.get("requestId") or uuid.uuid4())
    if isinstance(context, dict):
        context["maofRequestId"] = request_id
    return request_id


def _path(request: Request | None) -> str:
    return str(getattr(request, "path", "unknown"))
