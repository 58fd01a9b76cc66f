"""The errors a MAOF client raises: the API's error envelope as exceptions, one class per code."""

from __future__ import annotations

from typing import Any


class MaofError(Exception):
    """An error the API answered with `{"success": false, "error": {...}}`, or a failure to
    get any answer at all (`status` is None then).

    `code`, `message`, `details` and `request_id` are the envelope's; quote the request id
    when asking an operator: the API logs every unexpected error under it.
    """

    code = "ERROR"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        request_id: str | None = None,
        details: Any = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.request_id = request_id
        self.details = details
        self.status = status

    def __str__(self) -> str:
        text = f"{self.code}: {self.message}"
        if self.request_id:
            text += f" (request id {self.request_id})"
        return text


class ValidationError(MaofError):
    """400: a field was refused; `details` is `[{field, message}]`."""

    code = "VALIDATION_ERROR"


class BadRequest(MaofError):
    code = "BAD_REQUEST"


class Unauthorized(MaofError):
    code = "UNAUTHORIZED"


class Forbidden(MaofError):
    code = "FORBIDDEN"


class NotFound(MaofError):
    code = "NOT_FOUND"


class MethodNotAllowed(MaofError):
    code = "METHOD_NOT_ALLOWED"


class Conflict(MaofError):
    code = "CONFLICT"


class PayloadTooLarge(MaofError):
    code = "PAYLOAD_TOO_LARGE"


class UnsupportedMediaType(MaofError):
    code = "UNSUPPORTED_MEDIA_TYPE"


class TryLater(MaofError):
    """An answer asking to send the request again later: `retry_after` is how many seconds
    the API asked to wait (None if it did not say)."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class RateLimited(TryLater):
    """429: too many requests for now."""

    code = "RATE_LIMITED"


class ServiceUnavailable(TryLater):
    """503: a dependency of the API is away (restarting, unreachable) for now."""

    code = "SERVICE_UNAVAILABLE"


class InternalError(MaofError):
    code = "INTERNAL_ERROR"


class NotSignedIn(Unauthorized):
    """No tokens are stored for this API, or the session behind them has ended (a refresh
    was refused): sign in again."""

    code = "NOT_SIGNED_IN"


class ConnectionFailed(MaofError):
    """The API could not be reached, or did not answer in time; the message names the URL."""

    code = "CONNECTION_FAILED"


class RequestFailed(MaofError):
    """The request could not be sent, or its answer not read, for a reason other than an
    unreachable API (a URL requests cannot use, a body that is not JSON, a broken answer);
    the message names the request and the reason."""

    code = "REQUEST_FAILED"


class UnexpectedResponse(MaofError):
    """The server answered something that is not MAOF's envelope (a proxy's error page...)."""

    code = "UNEXPECTED_RESPONSE"


ERRORS_BY_CODE: dict[str, type[MaofError]] = {
    cls.code: cls
    for cls in (
        ValidationError,
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        MethodNotAllowed,
        Conflict,
        PayloadTooLarge,
        UnsupportedMediaType,
        RateLimited,
        ServiceUnavailable,
        InternalError,
    )
}


def error_from_envelope(body: Any, status: int, retry_after_header: str | None = None) -> MaofError:
    """The exception for a failed answer: the envelope's error when there is one, else an
    UnexpectedResponse naming the HTTP status."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("code"), str):
        return UnexpectedResponse(
            f"The server answered HTTP {status} without MAOF's error envelope", status=status
        )
    code = str(error["code"])
    message = str(error.get("message") or code)
    common: dict[str, Any] = {
        "code": code,
        "request_id": error.get("requestId"),
        "details": error.get("details"),
        "status": status,
    }
    cls = ERRORS_BY_CODE.get(code, MaofError)
    if issubclass(cls, TryLater):
        return cls(message, retry_after=_retry_after(error, retry_after_header), **common)
    return cls(message, **common)


def _retry_after(error: dict[str, Any], header: str | None) -> float | None:
    details = error.get("details")
    if isinstance(details, dict) and isinstance(details.get("retryAfterSeconds"), int | float):
        return float(details["retryAfterSeconds"])
    try:
        return float(header) if header is not None else None
    except ValueError:
        return None
