"""Structured JSON logging; secrets never go in a log line."""

from __future__ import annotations

from aws_lambda_powertools import Logger

from chalicelib.config import import_time_setting

logger = Logger(
    service="maof",
    level=import_time_setting("log_level").upper(),
    # Fields that must never be printed even if a caller passes them by mistake.
    log_record_order=["timestamp", "level", "message"],
)

SECRET_KEYS = frozenset(
    {"password", "authToken", "auth_token", "accessToken", "refreshToken", "token", "secret"}
)


def redact(fields: dict[str, object]) -> dict[str, object]:
    """A copy of `fields` with secret-looking values replaced."""
    return {k: ("[redacted]" if k in SECRET_KEYS else v) for k, v in fields.items()}
