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


def fits_double(number: int) -> bool:
    """Whether an integer is within an IEEE double's range, as JSON numbers are (RFC 8259;
    RFC 8785 hashes them as doubles): one beyond it cannot be hashed for the audit trail."""
    if number.bit_length() <= 1000:  # well inside it, and cheap to tell
        return True
    try:
        float(number)
    except OverflowError:
        return False
    return True
