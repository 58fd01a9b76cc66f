"""Request validation and the envelope helpers, without a server."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from chalicelib.core import errors
from chalicelib.core.api import ApiModel, PageQuery
from chalicelib.core.encoding import dumps, served_size, stored_size
from chalicelib.http import error_body, validate


class Inner(ApiModel):
    label: str


class Body(ApiModel):
    display_name: str
    tags: list[str] = []
    extra_data: dict[str, Any] = {}
    inner: Inner | None = None


def details_of(data: Any) -> list[dict[str, str]]:
    with pytest.raises(errors.ValidationError) as caught:
        validate(Body, data)
    assert caught.value.status == 400
    assert caught.value.code == "VALIDATION_ERROR"
    return list(caught.value.details)


def test_request_bodies_use_camel_case_keys() -> None:
    body = validate(Body, {"displayName": "Ada", "extraData": {"a": 1}})
    assert body.display_name == "Ada"
    assert body.extra_data == {"a": 1}


def test_a_missing_field_is_named_in_camel_case() -> None:
    assert details_of({}) == [{"field": "displayName", "message": "is required"}]


def test_an_unknown_field_is_named() -> None:
    assert details_of({"displayName": "Ada", "colour": "red"}) == [
        {"field": "colour", "message": "unknown field"}
    ]


def test_a_nested_field_is_named_with_a_dotted_path() -> None:
    fields = [d["field"] for d in details_of({"displayName": "Ada", "inner": {}})]
    assert fields == ["inner.label"]


def test_an_empty_key_is_named_as_itself_not_as_the_whole_body() -> None:
    """`?=x` (or `{"": 1}`) was reported as field "body": the request body as a whole."""
    with pytest.raises(errors.ValidationError) as caught:
        validate(PageQuery, {"": "x"}, "query")
    assert caught.value.details == [{"field": "", "message": "unknown field"}]
    assert details_of({"displayName": "Ada", "": 1}) == [{"field": "", "message": "unknown field"}]


def test_an_error_of_the_whole_input_is_named_by_where_it_came_from() -> None:
    assert [d["field"] for d in details_of([])] == ["body"]
    with pytest.raises(errors.ValidationError) as caught:
        validate(PageQuery, [], "query")
    assert [d["field"] for d in caught.value.details] == ["query"]


def test_validation_errors_do_not_echo_the_input() -> None:
    secret = "s3cret-value-" + uuid.uuid4().hex
    details = details_of({"displayName": ["not", "a", "string", secret]})
    assert secret not in json.dumps(details)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"displayName": "A\x00da"}, "displayName"),
        ({"displayName": "Ada", "tags": ["ok", "b\x00d"]}, "tags"),
        ({"displayName": "Ada", "extraData": {"k": {"deep": ["\x00"]}}}, "extraData"),
        ({"displayName": "Ada", "extraData": {"k\x00": 1}}, "extraData"),
        ({"displayName": "Ada", "inner": {"label": "\x00"}}, "inner"),
    ],
)
def test_a_nul_character_anywhere_in_a_field_is_a_validation_error(
    data: dict[str, Any], field: str
) -> None:
    assert [d["field"] for d in details_of(data)] == [field]


def test_text_without_nul_characters_is_untouched() -> None:
    body = validate(Body, {"displayName": "Ada \u00e9\u4e2d\U0001f600", "tags": ["\\u0000"]})
    assert body.display_name == "Ada \u00e9\u4e2d\U0001f600"
    assert body.tags == ["\\u0000"]


def test_an_error_body_is_the_error_envelope() -> None:
    error = errors.Conflict("taken", [{"field": "email", "message": "already registered"}])
    assert error_body(error, "req-1") == {
        "success": False,
        "error": {
            "code": "CONFLICT",
            "message": "taken",
            "details": [{"field": "email", "message": "already registered"}],
            "requestId": "req-1",
        },
    }


def test_an_error_without_details_has_no_details_key() -> None:
    body = error_body(errors.NotFound("nothing here"), "req-2")
    assert body["error"] == {"code": "NOT_FOUND", "message": "nothing here", "requestId": "req-2"}


@pytest.mark.parametrize(
    ("kind", "status", "code"),
    [
        (errors.ValidationError, 400, "VALIDATION_ERROR"),
        (errors.BadRequest, 400, "BAD_REQUEST"),
        (errors.Unauthorized, 401, "UNAUTHORIZED"),
        (errors.Forbidden, 403, "FORBIDDEN"),
        (errors.NotFound, 404, "NOT_FOUND"),
        (errors.MethodNotAllowed, 405, "METHOD_NOT_ALLOWED"),
        (errors.Conflict, 409, "CONFLICT"),
        (errors.PayloadTooLarge, 413, "PAYLOAD_TOO_LARGE"),
        (errors.UnsupportedMediaType, 415, "UNSUPPORTED_MEDIA_TYPE"),
        (errors.RateLimited, 429, "RATE_LIMITED"),
        (errors.InternalError, 500, "INTERNAL_ERROR"),
        (errors.ServiceUnavailable, 503, "SERVICE_UNAVAILABLE"),
    ],
)
def test_each_error_has_its_status_and_code(
    kind: type[errors.ApiError], status: int, code: str
) -> None:
    error = kind("message")
    assert (error.status, error.code, error.message) == (status, code, "message")


def test_dumps_writes_datetimes_uuids_and_decimals() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    ident = uuid.uuid4()
    assert json.loads(dumps({"at": when, "id": ident, "n": Decimal("1.5")})) == {
        "at": "2026-01-02T03:04:05+00:00",
        "id": str(ident),
        "n": 1.5,
    }


def test_dumps_refuses_what_it_cannot_write() -> None:
    with pytest.raises(TypeError):
        dumps({"x": object()})


@pytest.mark.parametrize(
    ("text", "as_stored"),
    [
        ("[1e+308]", "[1" + "0" * 308 + "]"),
        ("[-1.7976931348623157e+308]", "[-17976931348623157" + "0" * 292 + "]"),
        # A negative exponent comes back a float, served as written: 3.2e-12 is not the
        # 15 bytes of 0.0000000000032 (ordinary small floats were refused under their cap).
        ("[5e-324,3.2e-12]", "[5e-324,3.2e-12]"),
        ('{"n":1e-07,"m":1.5E+3,"k":1e+3}', '{"n":1e-07,"m":1.5E+3,"k":1000}'),
        # A mantissa longer than the number: never counted smaller than written.
        ("[1.2345678901234567e+16]", "[1.2345678901234567e+16]"),
        ("[12345678901234567890,1.5,-0.0,0]", "[12345678901234567890,1.5,-0.0,0]"),
    ],
)
def test_stored_size_counts_a_number_with_an_exponent_written_out_as_jsonb_stores_it(
    text: str, as_stored: str
) -> None:
    """Postgres stores a JSON number as numeric and writes it back without an exponent:
    1e308 was measured at 6 bytes and served as 309 digits."""
    assert stored_size(text) == len(as_stored)


@pytest.mark.parametrize(
    ("text", "as_stored"),
    [
        ('["1e308"]', '["1e308"]'),
        ('{"1e308":"x 1e+308 é"}', '{"1e308":"x 1e+308 é"}'),
        # An escaped quote does not end the string; an escaped backslash before one does.
        ('["a\\"1e308","\\\\",1e3]', '["a\\"1e308","\\\\",1000]'),
    ],
)
def test_stored_size_reads_no_number_inside_a_string(text: str, as_stored: str) -> None:
    assert stored_size(text) == len(as_stored.encode("utf-8"))


@pytest.mark.parametrize(
    "value",
    ['"' * 10, "a\\b", {"é": "中\U0001f600"}, "x\n\x01\x7f", {"k": ['"', 1.5, None]}, []],
)
@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_served_size_is_the_size_of_the_value_inside_the_lambda_response(
    value: Any, ensure_ascii: bool
) -> None:
    """The API serves ASCII JSON and Lambda embeds the body as a JSON string: a `"` of a
    stored string is 4 bytes there, an emoji 14. Stored text, escaped or not, measures
    the same."""
    served = dumps(value)
    in_the_response = len(json.dumps(served)) - 2  # without the string's own quotes
    text = json.dumps(value, ensure_ascii=ensure_ascii, separators=(",", ":"))
    assert served_size(text) == in_the_response


def test_served_size_counts_numbers_as_stored() -> None:
    assert served_size("[1e308]") == len("[]") + 309
