"""The one hierarchy of errors the API answers with (code, status, message, details).

Plain exceptions, raised anywhere in the domain; the HTTP adapter (chalicelib/http.py)
turns them into the envelope in one place."""

from __future__ import annotations

import math
from typing import Any


class ApiError(Exception):
    """An error the client gets as `{"success": false, "error": {...}}`."""

    code = "INTERNAL_ERROR"
    status = 500
    headers: dict[str, str] = {}  # read-only; subclasses set their own

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class ValidationError(ApiError):
    code = "VALIDATION_ERROR"
    status = 400


class BadRequest(ApiError):
    code = "BAD_REQUEST"
    status = 400


class Unauthorized(ApiError):
    code = "UNAUTHORIZED"
    status = 401


class Forbidden(ApiError):
    code = "FORBIDDEN"
    status = 403


class NotFound(ApiError):
    code = "NOT_FOUND"
    status = 404


class MethodNotAllowed(ApiError):
    code = "METHOD_NOT_ALLOWED"
    status = 405


class Conflict(ApiError):
    code = "CONFLICT"
    status = 409


class PayloadTooLarge(ApiError):
    code = "PAYLOAD_TOO_LARGE"
    status = 413


class UnsupportedMediaType(ApiError):
    code = "UNSUPPORTED_MEDIA_TYPE"
    status = 415


class RateLimited(ApiError):
    """429 with `Retry-After` (whole seconds) as a header and in the details."""

    code = "RATE_LIMITED"
    status = 429

    def __init__(self, message: str, retry_after_seconds: float = 60) -> None:
        seconds = max(1, math.ceil(retry_after_seconds))
        super().__init__(message, {"retryAfterSeconds": seconds})
        self.headers = {"Retry-After": str(seconds)}


class ServiceUnavailable(ApiError):
    """503 with `Retry-After`: a dependency is away (restarting, unreachable) for now."""

    code = "SERVICE_UNAVAILABLE"
    status = 503
    headers = {"Retry-After": "5"}


class InternalError(ApiError):
    code = "INTERNAL_ERROR"
    status = 500
