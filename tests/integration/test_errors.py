"""The one error path: every failure is a JSON envelope with a request id, and nothing leaks."""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from chalicelib.auth import service
from chalicelib.config import get_settings
from chalicelib.logs import logger
from tests.integration.conftest import (
    Api,
    end_app_sessions,
    free_port,
    set_read_only,
    unique_email,
)

JSON = {"Content-Type": "application/json"}


def error_of(response: requests.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The error object of an error envelope, after checking status and shape."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["success"] is False
    error = body["error"]
    assert set(error) <= {"code", "message", "details", "requestId"}
    assert isinstance(error["message"], str)
    assert error["message"]
    assert error["requestId"] == response.headers["X-Request-Id"]
    if code is not None:
        assert error["code"] == code
    return dict(error)


def post_raw(api: Api, path: str, data: bytes | str, headers: dict[str, str]) -> requests.Response:
    return api.request("POST", path, data=data, headers=headers)


# ------------------------------------------------------------------ the request is refused


def test_malformed_json_is_400_bad_request(api: Api) -> None:
    response = post_raw(api, "/auth/login", '{"email": "a@example.com", ', JSON)
    error_of(response, 400, "BAD_REQUEST")


def test_a_body_that_is_not_utf8_is_400_bad_request(api: Api) -> None:
    error_of(post_raw(api, "/auth/login", b'{"email": "\xff"}', JSON), 400, "BAD_REQUEST")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32", "utf-32-be"])
def test_a_utf16_or_utf32_body_is_400_like_any_body_not_utf8(api: Api, encoding: str) -> None:
    """json.loads of bytes guesses UTF-16 and UTF-32 and read them; bodies are UTF-8."""
    body = json.dumps({"email": unique_email(), "password": "password-1", "name": "Ada"})
    response = post_raw(api, "/auth/register", body.encode(encoding), JSON)
    error_of(response, 400, "BAD_REQUEST")


def test_a_utf8_body_with_a_byte_order_mark_is_read(api: Api) -> None:
    body = json.dumps({"email": unique_email(), "password": "password-1", "name": "Ada"})
    response = post_raw(api, "/auth/register", body.encode("utf-8-sig"), JSON)
    assert response.status_code == 201, response.text


def test_an_empty_body_is_400_bad_request(api: Api) -> None:
    error_of(post_raw(api, "/auth/login", b"", JSON), 400, "BAD_REQUEST")


@pytest.mark.parametrize("body", ["[]", '[{"email": "a@example.com"}]', '"text"', "42", "null"])
def test_a_body_that_is_not_a_json_object_is_400(api: Api, body: str) -> None:
    error = error_of(post_raw(api, "/auth/login", body, JSON), 400)
    assert error["code"] in ("VALIDATION_ERROR", "BAD_REQUEST")


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (
            "/agents/register",
            {
                "agentId": "snake",
                "name": "Snake",
                "endpoint": "mock://snake",
                "authToken": "t",
                "capabilities": ["x"],
                "max_concurrent_tasks": 3,
            },
            "max_concurrent_tasks",
        ),
        ("/auth/refresh", {"refresh_token": "x"}, "refresh_token"),
        (
            "/workflows/execute",
            {
                "workflow": {
                    "name": "w",
                    "timeout_ms": 5000,
                    "stages": [{"id": "a", "name": "A", "agentCapability": "x"}],
                }
            },
            "workflow.timeout_ms",
        ),
    ],
    ids=["register", "refresh", "execute"],
)
def test_a_snake_case_key_is_an_unknown_field(user: Api, path: str, body: Any, field: str) -> None:
    """Keys are camelCase: `max_concurrent_tasks` was taken for maxConcurrentTasks (and
    `refresh_token` for refreshToken), which neither the docs nor /openapi name."""
    response = user.post(path, body)
    assert response.status_code == 400, response.text
    assert field in {d["field"] for d in response.json()["error"]["details"]}


@pytest.mark.parametrize(
    ("method", "path", "fields"),
    [
        ("GET", "/stats?window=24h", ["window"]),
        ("GET", "/auth/me?fields=email&verbose=1", ["fields", "verbose"]),
        ("GET", "/health?verbose=1", ["verbose"]),
        ("POST", "/auth/logout-all?everywhere=1", ["everywhere"]),
    ],
)
def test_a_query_parameter_of_a_route_that_reads_none_is_an_unknown_field(
    user: Api, method: str, path: str, fields: list[str]
) -> None:
    """A route with no query model never read its query string: a typo'd or unsupported
    filter was silently ignored (/stats answered its usual window)."""
    error = error_of(user.request(method, path), 400, "VALIDATION_ERROR")
    assert error["details"] == [{"field": f, "message": "unknown field"} for f in fields]


def test_an_unknown_empty_query_parameter_is_named_as_itself_not_as_the_body(user: Api) -> None:
    error = error_of(user.get("/workflows?=x"), 400, "VALIDATION_ERROR")
    assert error["details"] == [{"field": "", "message": "unknown field"}]


def test_wrong_content_type_is_415_with_the_envelope(api: Api) -> None:
    body = json.dumps({"email": unique_email(), "password": "password-1"})
    response = post_raw(api, "/auth/login", body, {"Content-Type": "text/plain"})
    error_of(response, 415, "UNSUPPORTED_MEDIA_TYPE")


@pytest.mark.parametrize(
    "content_type",
    ["text/plain;application/json", "*/*", "text/html, application/json"],
)
def test_a_content_type_that_only_mentions_json_is_415(api: Api, content_type: str) -> None:
    """Chalice's check took application/json anywhere in the header, or */*: a browser sends
    `text/plain;application/json` cross-origin without a preflight, and it was read as JSON."""
    body = json.dumps({"email": unique_email(), "password": "password-1", "name": "Ada"})
    response = post_raw(api, "/auth/register", body, {"Content-Type": content_type})
    error_of(response, 415, "UNSUPPORTED_MEDIA_TYPE")


def test_json_with_a_charset_is_accepted(api: Api) -> None:
    body = json.dumps({"email": unique_email(), "password": "password-1", "name": "Ada"})
    response = post_raw(
        api, "/auth/register", body, {"Content-Type": "application/json; charset=utf-8"}
    )
    assert response.status_code == 201, response.text


def test_an_unknown_route_is_a_json_404(api: Api) -> None:
    error_of(api.get("/nope"), 404, "NOT_FOUND")


def test_an_unknown_route_with_a_bearer_token_is_a_json_404_that_does_not_echo_it(
    api: Api,
) -> None:
    response = api.get("/no/such/route", headers={"Authorization": "Bearer s3cr3t"})
    error_of(response, 404, "NOT_FOUND")
    assert "s3cr3t" not in response.text


def test_a_wrong_method_is_a_json_405(api: Api) -> None:
    error_of(api.delete("/health"), 405, "METHOD_NOT_ALLOWED")


@pytest.mark.parametrize("method", ["TRACE", "QUERY", "PROPFIND"])
def test_a_method_no_route_knows_is_a_json_405_not_the_servers_html_501(
    api: Api, method: str
) -> None:
    error_of(api.request(method, "/health"), 405, "METHOD_NOT_ALLOWED")


def test_a_body_over_the_limit_is_413(api: Api) -> None:
    limit = get_settings().max_body_bytes
    assert limit == 1_000_000
    body = json.dumps({"email": unique_email(), "password": "x" * limit, "name": "Ada"})
    assert len(body) > limit
    error_of(post_raw(api, "/auth/register", body, JSON), 413, "PAYLOAD_TOO_LARGE")


def test_a_body_at_the_limit_is_not_refused_for_its_size(api: Api) -> None:
    limit = get_settings().max_body_bytes
    body = json.dumps({"email": unique_email(), "password": "password-1", "name": "Ada"})
    body = body[:-1] + " " * (limit - len(body)) + "}"
    assert len(body) == limit
    assert post_raw(api, "/auth/register", body, JSON).status_code == 201


@pytest.mark.parametrize("field", ["email", "password", "name"])
def test_a_nul_character_in_a_field_is_400_naming_it_not_a_500(api: Api, field: str) -> None:
    body = {"email": unique_email(), "password": "password-1", "name": "Ada"}
    body[field] = body[field][:3] + "\x00" + body[field][3:]
    error = error_of(api.post("/auth/register", body), 400, "VALIDATION_ERROR")
    assert [d["field"] for d in error["details"]] == [field]


def test_a_nul_character_in_a_login_email_is_400_not_a_500(api: Api) -> None:
    response = api.post("/auth/login", {"email": "a\x00b@example.com", "password": "password-1"})
    error_of(response, 400, "VALIDATION_ERROR")


def execute_body(input_json: str = "null", stage_input_json: str = "null") -> str:
    """An execute body from raw JSON text: json.dumps cannot write what these tests send."""
    stage = f'{{"id": "a", "name": "A", "agentCapability": "x", "input": {stage_input_json}}}'
    return f'{{"workflow": {{"name": "w", "stages": [{stage}]}}, "input": {input_json}}}'


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json_a_400_not_a_500(user: Api, sent: Any, literal: str) -> None:
    response = post_raw(user, "/workflows/execute", execute_body(f'{{"x": {literal}}}'), JSON)
    assert error_of(response, 400, "BAD_REQUEST")["message"] == "Request body is not valid JSON"


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        (execute_body('{"x": 1e400}'), "input", "range"),
        (execute_body("[-1e999]"), "input", "range"),
        (execute_body("9" * 400), "input", "range"),
        # Named by the body's field that holds it, as for NUL characters.
        (execute_body(stage_input_json='{"t": "\\ud800"}'), "workflow", "surrogates"),
        (execute_body('{"\\udfff": 1}'), "input", "surrogates"),
    ],
    ids=["overflowing float", "overflowing negative", "int past a double", "surrogate", "key"],
)
def test_a_value_postgres_or_the_audit_cannot_hold_is_400_naming_its_field(
    user: Api, sent: Any, body: str, field: str, message: str
) -> None:
    error = error_of(post_raw(user, "/workflows/execute", body, JSON), 400, "VALIDATION_ERROR")
    assert [d["field"] for d in error["details"]] == [field]
    assert message in error["details"][0]["message"]
    assert sent.sent == []  # nothing was stored or queued


# ------------------------------------------------------------------ the server fails


@pytest.fixture
def failing_me(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(principal: Any) -> Any:
        raise RuntimeError("boom secret")

    monkeypatch.setattr(service, "me", boom)


def test_an_unexpected_exception_is_a_500_that_leaks_nothing(user: Api, failing_me: None) -> None:
    response = user.get("/auth/me")
    error = error_of(response, 500, "INTERNAL_ERROR")
    assert "details" not in error
    assert "boom" not in response.text
    assert "secret" not in response.text
    assert "Traceback" not in response.text
    assert "RuntimeError" not in response.text
    assert error["requestId"] == response.headers["X-Request-Id"]
    assert response.headers["Access-Control-Allow-Origin"]


def test_after_an_unexpected_exception_the_next_request_is_served(
    user: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "me", lambda principal: 1 / 0)
    error_of(user.get("/auth/me"), 500, "INTERNAL_ERROR")
    monkeypatch.undo()
    assert user.get("/auth/me").status_code == 200


# ------------------------------------------------------------------ every response


def _requests(api: Api, user: Api) -> dict[str, Callable[[], requests.Response]]:
    return {
        "200 health": lambda: api.get("/health"),
        "200 me": lambda: user.get("/auth/me"),
        "201 register": lambda: api.post(
            "/auth/register", {"email": unique_email(), "password": "password-1", "name": "A"}
        ),
        "400 validation": lambda: api.post("/auth/register", {}),
        "400 bad json": lambda: post_raw(api, "/auth/login", "{", JSON),
        "401 no token": lambda: api.get("/auth/me"),
        "401 wrong password": lambda: api.post(
            "/auth/login", {"email": unique_email(), "password": "password-1"}
        ),
        "404 unknown route": lambda: api.get("/nope"),
        "405 wrong method": lambda: api.delete("/health"),
        "413 too large": lambda: post_raw(api, "/auth/login", "x" * 1_000_001, JSON),
        "415 wrong type": lambda: post_raw(
            api, "/auth/login", "{}", {"Content-Type": "text/plain"}
        ),
    }


CASES = [
    "200 health",
    "200 me",
    "201 register",
    "400 validation",
    "400 bad json",
    "401 no token",
    "401 wrong password",
    "404 unknown route",
    "405 wrong method",
    "413 too large",
    "415 wrong type",
]


@pytest.mark.parametrize("case", CASES)
def test_every_response_carries_a_request_id_and_cors_origin(
    api: Api, user: Api, case: str
) -> None:
    cases = _requests(api, user)
    assert set(cases) == set(CASES)
    response = cases[case]()
    assert str(response.status_code) == case.split()[0], response.text
    assert response.headers.get("X-Request-Id")
    assert response.headers.get("Access-Control-Allow-Origin") == get_settings().cors_origin
    body = response.json()
    assert body["success"] is (response.status_code < 400)
    if response.status_code >= 400:
        assert body["error"]["requestId"] == response.headers["X-Request-Id"]


def test_every_request_gets_its_own_request_id(api: Api) -> None:
    ids = {api.get("/health").headers["X-Request-Id"] for _ in range(3)}
    ids |= {api.get("/nope").headers["X-Request-Id"] for _ in range(3)}
    assert len(ids) == 6


# ------------------------------------------------------------------ the local server's wire


def connect(api_url: str) -> socket.socket:
    """A raw connection to the local server, each read failing after 5 s."""
    url = urlsplit(api_url)
    return socket.create_connection((url.hostname, url.port), timeout=5)


def read_to_close(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def host(api_url: str) -> str:
    return f"Host: {urlsplit(api_url).netloc}\r\n"


def test_a_head_answer_is_its_headers_alone_so_the_next_answer_is_intact(api_url: str) -> None:
    """RFC 9110 9.3.2: a HEAD answer carries no body; bytes after its headers would be read,
    on the same keep-alive connection, as the start of the next answer."""
    with connect(api_url) as sock:
        sock.sendall(f"HEAD /health HTTP/1.1\r\n{host(api_url)}\r\n".encode())
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 405")
        assert b"Content-Type: application/json" in head
        sock.sendall(f"GET /health HTTP/1.1\r\n{host(api_url)}Connection: close\r\n\r\n".encode())
        rest = read_to_close(sock)
    assert rest.startswith(b"HTTP/1.1 200"), rest[:200]


def test_an_idle_or_half_sent_connection_is_closed_after_the_handlers_timeout(
    api_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP/1.1 keeps connections alive, and the handler had no timeout: every connection
    left idle after an answer, or whose request was never finished, held a server thread
    and socket for as long as its client kept it open. The handler's timeout (shortened
    here, so as not to wait for it) closes both; `connect`'s 5 s reads are the deadline."""
    from devstack.api import MaofRequestHandler

    assert MaofRequestHandler.timeout is not None
    monkeypatch.setattr(MaofRequestHandler, "timeout", 1)
    with connect(api_url) as idle, connect(api_url) as half_sent:
        idle.sendall(f"GET /health HTTP/1.1\r\n{host(api_url)}\r\n".encode())
        half_sent.sendall(f"GET /health HTTP/1.1\r\n{host(api_url)}".encode())  # no end
        code, _, _ = answer_of(read_to_close(idle))
        assert code == 200
        assert read_to_close(half_sent) == b""
    # Still serving.
    with connect(api_url) as sock:
        sock.sendall(f"GET /health HTTP/1.1\r\n{host(api_url)}Connection: close\r\n\r\n".encode())
        assert answer_of(read_to_close(sock))[0] == 200


def answer_of(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """The status, headers (lower-cased names) and body of one raw HTTP/1.1 answer."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return int(status_line.split()[1]), {k.lower(): v for k, v in headers.items()}, body


def refused_on_the_wire(api_url: str, request: str, status: int) -> dict[str, Any]:
    """The error of the envelope the local server answers `request` with, closing."""
    with connect(api_url) as sock:
        sock.sendall(request.encode())
        code, headers, body = answer_of(read_to_close(sock))
    assert code == status, body
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    envelope = json.loads(body)
    assert envelope["success"] is False
    assert envelope["error"]["code"] == "BAD_REQUEST"
    assert envelope["error"]["requestId"] == headers["x-request-id"]
    return dict(envelope["error"])


def test_too_many_headers_is_the_error_envelope_not_html(api_url: str) -> None:
    extra = "".join(f"X-H{i}: v\r\n" for i in range(120))  # http.server reads 100
    request = f"GET /health HTTP/1.1\r\n{host(api_url)}{extra}\r\n"
    refused_on_the_wire(api_url, request, 431)


@pytest.mark.parametrize("length", ["abc", "+2", "1_0", "-1", "2, 2", "2\r\nContent-Length: 3"])
def test_a_malformed_content_length_is_400_with_the_envelope(api_url: str, length: str) -> None:
    """int() raised in Chalice's handler (a traceback in the log, no answer) or read "+2" and
    "1_0" as numbers; two different lengths leave the body's end unknown."""
    request = (
        f"POST /auth/login HTTP/1.1\r\n{host(api_url)}Content-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n{{}}"
    )
    error = refused_on_the_wire(api_url, request, 400)
    assert "Content-Length" in error["message"]


def test_a_content_length_past_the_gateways_limit_is_413_unread(api_url: str) -> None:
    """Digits alone, but more than a read can take: Chalice's handler raised (a traceback,
    no answer). API Gateway refuses a body past 10 MB before the function; so does this."""
    request = (
        f"POST /auth/login HTTP/1.1\r\n{host(api_url)}Content-Type: application/json\r\n"
        "Content-Length: 99999999999999999999\r\n\r\n{}"
    )
    with connect(api_url) as sock:
        sock.sendall(request.encode())
        code, headers, body = answer_of(read_to_close(sock))
    assert code == 413, body
    assert json.loads(body)["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert headers["connection"] == "close"


@pytest.mark.parametrize("line", ["GARBAGE", "GET /health HTTP/9.9", "GET /health HTTP/1.x"])
def test_an_unreadable_request_line_gets_a_status_line_and_the_envelope(
    api_url: str, line: str
) -> None:
    """http.server answers before it has read a version as if to HTTP/0.9: the envelope
    alone, with no status line or headers."""
    refused_on_the_wire(api_url, f"{line}\r\n{host(api_url)}\r\n", 505 if "9.9" in line else 400)


def test_a_chunked_body_is_411_and_never_read_as_the_next_request(api_url: str) -> None:
    """Chalice's handler reads Content-Length bytes only: the chunks were parsed as a
    request of their own, after a 400 "Request body is required"."""
    request = (
        f"POST /auth/login HTTP/1.1\r\n{host(api_url)}Content-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
        f"GET /health HTTP/1.1\r\n{host(api_url)}\r\n"
    )
    error = refused_on_the_wire(api_url, request, 411)
    assert "Content-Length" in error["message"]


def test_a_burst_of_clients_waits_to_be_accepted_rather_than_being_refused() -> None:
    """The local server listened with the stdlib's backlog of 5: 20 to 30 clients at once,
    arriving faster than its one thread accepts them, had connections reset. Here none is
    accepted until all have connected and sent their request: each must be answered."""
    from devstack.api import create_server

    port = free_port()
    server = create_server("127.0.0.1", port)  # listening, not yet accepting
    clients: list[socket.socket] = []
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    try:
        for _ in range(30):
            # The kernel completes a handshake at once while the listen queue has room; a
            # client past it has its SYN dropped, and times out here.
            try:
                clients.append(socket.create_connection(("127.0.0.1", port), timeout=0.5))
            except TimeoutError:
                break
        assert len(clients) == 30, f"{len(clients)} of 30 clients could connect"
        for client in clients:
            client.settimeout(10)
            client.sendall(
                f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                "Connection: close\r\n\r\n".encode()
            )
        serving.start()
        answers = [answer_of(read_to_close(client))[0] for client in clients]
    finally:
        for client in clients:
            client.close()
        if serving.is_alive():
            server.shutdown()
        server.server.server_close()
    assert answers == [200] * 30


# ------------------------------------------------------------------ logs


class _CurrentStdout:
    """Writes to whatever sys.stdout is now: pytest swaps it for each test phase."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


@pytest.fixture
def logs(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[[], str]]:
    """Everything logged (at DEBUG and up) or printed during the test, as one string.

    The logger's handler keeps the stdout of the moment it was created, which pytest has long
    closed; for the test it writes to the current one, which capsys captures.
    """
    handler = logger.registered_handler
    assert isinstance(handler, logging.StreamHandler)
    maof_logger = logging.getLogger(logger.service)
    assert maof_logger.handlers == [handler], "something else configured MAOF's logger"
    previous_stream, handler.stream = handler.stream, _CurrentStdout()
    previous_level = logger.log_level
    logger.setLevel("DEBUG")
    captured: list[str] = []

    def read() -> str:
        out = capsys.readouterr()
        captured.append(out.out + out.err)
        return "".join(captured)

    try:
        marker = f"log-capture-check-{uuid.uuid4().hex}"
        logger.debug(marker)
        assert marker in read(), "the logger's output is not being captured"
        captured.clear()
        yield read
    finally:
        logger.setLevel(previous_level)
        handler.stream = previous_stream


def test_passwords_and_tokens_never_appear_in_the_logs(api: Api, logs: Callable[[], str]) -> None:
    email = unique_email()
    password = f"pw-{uuid.uuid4().hex}"
    short_password = f"s{uuid.uuid4().hex[:5]}"
    created = api.post("/auth/register", {"email": email, "password": password, "name": "Ada"})
    assert created.status_code == 201
    rejected = api.post(
        "/auth/register", {"email": unique_email(), "password": short_password, "name": "Ada"}
    )
    assert rejected.status_code == 400
    assert short_password not in rejected.text
    wrong = api.post("/auth/login", {"email": email, "password": password + "-wrong"})
    assert wrong.status_code == 401
    login = api.post("/auth/login", {"email": email, "password": password})
    assert login.status_code == 200
    tokens = login.json()["data"]
    refreshed = api.post("/auth/refresh", {"refreshToken": tokens["refreshToken"]})
    assert refreshed.status_code == 200
    me = api.get("/auth/me", headers={"Authorization": f"Bearer {tokens['accessToken']}"})
    assert me.status_code == 200

    output = logs()
    secrets = [
        password,
        short_password,
        tokens["accessToken"],
        tokens["refreshToken"],
        refreshed.json()["data"]["accessToken"],
        refreshed.json()["data"]["refreshToken"],
    ]
    for secret in secrets:
        assert secret not in output
    # Nor the signature part alone (a token split across fields would still leak).
    for token in secrets[2:]:
        assert token.rsplit(".", 1)[1] not in output


def test_an_unexpected_exception_is_logged_with_its_request_id(
    user: Api, failing_me: None, logs: Callable[[], str]
) -> None:
    response = user.get("/auth/me")
    assert response.status_code == 500
    lines = [json.loads(line) for line in logs().splitlines() if line.startswith("{")]
    errors = [line for line in lines if line.get("level") == "ERROR"]
    assert any(
        line.get("requestId") == response.headers["X-Request-Id"] and "boom" in line["exception"]
        for line in errors
    ), errors
    assert user.token is not None
    assert user.token not in logs()


def test_a_database_outage_answers_503_not_500(user, monkeypatch):
    from sqlalchemy.exc import OperationalError

    from chalicelib.workflows import runs

    def unreachable(*args, **kwargs):
        raise OperationalError("INSERT …", {}, Exception("the database system is starting up"))

    monkeypatch.setattr(runs, "submit", unreachable)
    body = {"workflow": {"name": "w", "stages": [{"id": "a", "name": "A", "agentCapability": "x"}]}}
    response = user.post("/workflows/execute", body)
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "SERVICE_UNAVAILABLE"
    assert "starting up" not in error["message"]  # nothing of the driver's words
    assert response.headers["Retry-After"] == "5"


def test_a_database_outage_while_checking_the_token_answers_503_not_500(user, monkeypatch):
    """The session behind a token not in Redis's cache is read from the database before
    the view runs: that read's failure was an unhandled 500 without a request id."""
    from sqlalchemy.exc import OperationalError

    from chalicelib.auth import sessions

    def unreachable(*args, **kwargs):
        raise OperationalError("SELECT …", {}, Exception("connection refused"))

    monkeypatch.setattr(sessions.cache, "get_json", lambda *_: None)
    monkeypatch.setattr(sessions, "_session_state", unreachable)
    response = user.get("/agents")
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert response.headers["Retry-After"] == "5"


def test_writes_on_a_read_only_database_answer_503_and_reads_still_answer(
    api, user, read_only_database
):
    """A failover to a read-only node: Postgres refuses every write (ReadOnlySqlTransaction,
    an InternalError, not an OperationalError), which answered 500 INTERNAL_ERROR."""
    writes = {
        "POST /auth/register": api.post(
            "/auth/register",
            {
                "email": f"ro-{uuid.uuid4().hex[:10]}@example.com",
                "password": "correct-horse-battery",
                "name": "R",
            },
        ),
        "POST /workflows/execute": user.post(
            "/workflows/execute",
            {
                "workflow": {
                    "name": "w",
                    "stages": [{"id": "a", "name": "A", "agentCapability": "x"}],
                }
            },
        ),
        "POST /auth/logout-all": user.post("/auth/logout-all"),
    }
    for route, response in writes.items():
        assert response.status_code == 503, (route, response.status_code, response.text)
        assert response.json()["error"]["code"] == "SERVICE_UNAVAILABLE", route
        assert response.headers["Retry-After"] == "5", route
        assert "read-only" not in response.text, route  # nothing of the driver's words
    assert user.get("/workflows").status_code == 200
    assert user.get("/auth/me").status_code == 200


def test_connections_opened_on_a_read_only_node_are_replaced_once_a_write_fails(user):
    """A failover: the pool's connections were opened on a read-only node, then the
    database's address points at a writer again. They pass the pre-ping, and a write
    refused as read-only did not drop its connection: every write answered 503 until
    pool_recycle (300 s). Now the refused write drops them, and the next one goes through."""
    set_read_only(True)
    end_app_sessions()
    try:
        assert user.get("/workflows").status_code == 200  # a connection on the reader
    finally:
        set_read_only(False)  # new sessions are writable; the pooled one is not
    body = {"workflow": {"name": "w", "stages": [{"id": "a", "name": "A", "agentCapability": "x"}]}}
    first = user.post("/workflows/execute", body)
    assert first.status_code == 503, first.text  # on the reader's connection
    again = user.post("/workflows/execute", body)
    assert again.status_code == 202, again.text
