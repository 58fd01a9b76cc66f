"""JSON as MAOF stores and serves it: compact, datetimes in ISO 8601, UUIDs as strings,
Decimals as floats."""

from __future__ import annotations

import enum
import json
import math
import re
import uuid
from collections import Counter
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


# A JSON string, matched whole so that no text inside it is read as a number; or a number,
# captured when written with an exponent. A number is matched from its first character on,
# so a long run of digits is scanned once, not once from each of its digits.
_NUMBER_OR_STRING = re.compile(
    r'"[^"\\]*(?:\\.[^"\\]*)*+"'  # a string
    r"|(-?\d[\d.]*+[eE][+-]?\d++)"  # a number with an exponent
    r"|-?\d[\d.]*+"  # a number without
)


def stored_size(text: str) -> int:
    """Bytes of the JSON `text` (UTF-8) once stored: JSONB holds a number as Postgres's
    numeric, written out without an exponent, so `1e308` (5 bytes) is stored, and served,
    as 309 digits (a negative exponent comes back a float, served as written). The size
    every cap measures, so that what is stored, served and passed on is held to it. One
    regex pass over `text`, none when it holds no e."""
    size = len(text.encode("utf-8"))
    if "e" not in text and "E" not in text:
        return size
    exponents = Counter(_NUMBER_OR_STRING.findall(text))
    exponents.pop("", None)  # strings, and numbers written without an exponent
    growth = sum(
        times * max(len(format(Decimal(token), "f")) - len(token), 0)
        for token, times in exponents.items()
        # A negative exponent is read back as a float and written short again: 1e-300 is
        # served as 1e-300, whatever Postgres's text of it.
        if "-" not in token.lstrip("-")
    )
    return size + growth


def served_size(text: str) -> int:
    """Bytes the stored JSON `text` takes in a deployed answer: numbers as stored
    (stored_size), every other character than ASCII written as `\\uXXXX` (two of them
    beyond the BMP: the API serves ASCII), and the answer embedded as a string in the Lambda
    proxy response, which escapes each `"` and `\\` again. What the run cap counts: a
    Lambda function answers at most 6 MiB of that response, in which a `"` inside a string
    takes 4 bytes (2 in the stored JSON) and an emoji 14."""
    extra = text.count('"') + text.count("\\")  # each escaped again in the proxy JSON
    extra += 6 * text.count("\x7f")  # DEL too is served escaped (Python's ensure_ascii)
    if text.isascii():
        return stored_size(text) + extra
    ascii_chars = len(text.encode("ascii", "ignore"))
    astral = len(text.encode("utf-16-le")) // 2 - len(text)  # beyond the BMP: 2 escapes
    bmp = len(text) - ascii_chars - astral
    numbers = stored_size(text) - len(text.encode("utf-8"))  # what stored_size adds
    # `\uXXXX` once served, `\\uXXXX` in the proxy JSON: 7 bytes an escape.
    return ascii_chars + numbers + extra + 7 * bmp + 14 * astral


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


class Unstorable(enum.Enum):
    """What Postgres (text, JSONB) or the audit trail's canonical JSON (RFC 8785: IEEE
    doubles, Unicode) cannot hold."""

    NUL = "nul"  # U+0000 in a string or key
    SURROGATE = "surrogate"  # a lone surrogate: not Unicode
    NUMBER = "number"  # NaN, an infinity, or an integer beyond a double
    DEPTH = "depth"  # nesting past the limit asked for


def unstorable(value: Any, max_depth: int | None = None) -> tuple[Unstorable, Any] | None:
    """The first thing in `value` that cannot be stored and hashed, with the item itself;
    None when all can. Iterative: a hostile depth costs no stack."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return Unstorable.NUL, item
            if not item.isascii() and not encodes(item):
                return Unstorable.SURROGATE, item
        elif isinstance(item, dict | list | tuple):
            if max_depth is not None and depth >= max_depth:
                return Unstorable.DEPTH, item
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(item, float) and not math.isfinite(item):
            return Unstorable.NUMBER, item
        elif isinstance(item, int) and not fits_double(item):
            return Unstorable.NUMBER, item
    return None


def encodes(text: str, codec: str = "utf-8") -> bool:
    """Whether `text` encodes in `codec` (UTF-8: no lone surrogate)."""
    try:
        text.encode(codec)
    except UnicodeEncodeError:
        return False
    return True
