"""Structured JSON logging; secrets never go in a log line."""

from __future__ import annotations

import logging

from aws_lambda_powertools import Logger

from chalicelib.config import Settings, import_time_setting


def _import_time_level() -> str:
    """MAOF_LOG_LEVEL when logging knows it, else the default: the Logger would raise at
    import (a traceback) before Settings refuse the value, in one line, at start-up."""
    level = import_time_setting("log_level").upper()
    if isinstance(logging.getLevelName(level), int):
        return level
    return str(Settings.model_fields["log_level"].default)


logger = Logger(
    service="maof",
    level=_import_time_level(),
    log_record_order=["timestamp", "level", "message"],
)
