"""Capability tags: lowercase words joined by hyphens and dots (`code-audit.python`)."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, WithJsonSchema

CAPABILITY_PATTERN = re.compile(r"[a-z0-9]+(?:[-.][a-z0-9]+)*")
MAX_CAPABILITY_LENGTH = 100


def check_capability(value: str) -> str:
    if len(value) > MAX_CAPABILITY_LENGTH:
        raise ValueError(f"capability must be at most {MAX_CAPABILITY_LENGTH} characters")
    # fullmatch: `$` would also accept a trailing newline ("code-audit\n").
    if not CAPABILITY_PATTERN.fullmatch(value):
        raise ValueError(
            "capability must be lowercase words joined by '-' or '.', e.g. 'code-audit.python'"
        )
    return value


# The OpenAPI document states the same rule, so generated requests (and clients) can follow it.
Capability = Annotated[
    str,
    AfterValidator(check_capability),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": f"^{CAPABILITY_PATTERN.pattern}$",
            "maxLength": MAX_CAPABILITY_LENGTH,
        }
    ),
]
