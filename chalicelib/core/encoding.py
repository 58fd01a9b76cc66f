"""JSON as MAOF stores and serves it: compact, datetimes in ISO 8601, UUIDs as strings,
Decimals as floats."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any


def json_default(value: Any) -> Any:
    """What `json.dumps` cannot encode by itself, as MAOF encodes it."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Decimal):
        return float(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(value: Any) -> str:
    return json.dumps(value, default=json_default, separators=(",", ":"))
