"""What the API speaks, framework-free: the caller, request models and paging, run ids,
and an answer with a status (the HTTP adapter makes the envelope of it)."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from chalicelib.core import errors
from chalicelib.core.encoding import Unstorable, unstorable


@dataclass(frozen=True)
class Principal:
    """The authenticated caller."""

    user_uuid: uuid.UUID
    email: str
    role: str


@dataclass(frozen=True)
class Reply:
    """An answer with data; `error` makes it a failure that still carries data (/health)."""

    data: Any
    status: int = 200
    error: errors.ApiError | None = None


_WHY = {
    Unstorable.NUL: "must not contain NUL characters",
    Unstorable.SURROGATE: "must not contain unpaired surrogates (\\ud800-\\udfff)",
    Unstorable.NUMBER: "must not contain numbers beyond the range of a double",
}


def _unstorable(value: Any) -> str | None:
    """Why Postgres or the audit trail cannot hold `value`, or None."""
    found = unstorable(value)
    return None if found is None else _WHY[found[0]]


class ApiModel(BaseModel):
    """Base of request bodies: camelCase keys, unknown fields refused (the snake_case
    names too: `agent_id` is as unknown as any other key)."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        # Postgres refuses U+0000 and lone surrogates, and the audit hashes no number past a
        # double (1e400): answer 400 naming the field rather than 500 later.
        problem = _unstorable(value)
        if problem:
            raise ValueError(problem)
        return value


def _number_only(value: Any) -> Any:
    # Pydantic's lax mode takes `true` as 1 and "3" as 3: a client's bug, not an integer.
    if isinstance(value, bool | str):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value


# An integer of a JSON body: a number with no fractional part (3, 3.0), never a boolean or
# a string. Query parameters arrive as strings: QueryInteger, below, reads them. The
# optional one validates `int | None` as a whole: `JsonInteger | None` would hide a Field's
# bounds from the OpenAPI schema.
JsonInteger = Annotated[int, BeforeValidator(_number_only)]
OptionalJsonInteger = Annotated[int | None, BeforeValidator(_number_only)]


_PLAIN_INTEGER = re.compile(r"-?[0-9]+")


def _plain_integer(value: Any) -> Any:
    # Pydantic's lax mode reads "10_0" as 100 and " 10" or "+5" as 10 and 5: a typo, or
    # not an integer as `type: integer` means it. A minus sign stays, for the bound's words.
    if isinstance(value, str) and not _PLAIN_INTEGER.fullmatch(value):
        raise PydanticCustomError("int_parsing", "Input should be a valid integer")
    return value


# An integer of a query string: ASCII digits alone, an optional minus sign before them.
QueryInteger = Annotated[int, BeforeValidator(_plain_integer)]


class PageQuery(ApiModel):
    """`?page=&limit=` of every list; subclasses add their filters."""

    page: QueryInteger = Field(default=1, ge=1, le=100_000)
    limit: QueryInteger = Field(default=20, ge=1, le=100)

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.limit


def page_meta(total: int, query: PageQuery) -> dict[str, int]:
    return {
        "total": total,
        "page": query.page,
        "limit": query.limit,
        "pages": (total + query.limit - 1) // query.limit,
    }


RUN_PREFIX = "wfr-"


def run_ref(run_id: uuid.UUID) -> str:
    """A run's public id: `wfr-<uuid>`."""
    return f"{RUN_PREFIX}{run_id}"


def parse_run_ref(value: str) -> uuid.UUID:
    if not value.startswith(RUN_PREFIX):
        raise errors.NotFound("Workflow run not found")
    try:
        return uuid.UUID(value[len(RUN_PREFIX) :])
    except ValueError:
        raise errors.NotFound("Workflow run not found") from None
