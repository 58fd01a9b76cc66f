"""Structured JSON logging; secrets never go in a log line."""

from __future__ import annotations

from aws_lambda_powertools import Logger

from chalicelib.config import import_time_setting

logger = Logger(
    service="maof",
    level=import_time_setting("log_level").upper(),
    log_record_order=["timestamp", "level", "message"],
)
