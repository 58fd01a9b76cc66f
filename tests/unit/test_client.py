"""The Python client without a server: the envelope, its errors as exceptions, the token
refresh (once, rotated, stored before use) and retries of keyed submissions."""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import pytest
import requests
from requests.adapters import BaseAdapter

from maof_client import errors
from maof_client.client import MaofClient, MemoryTokenStore, access_token_expiry
from maof_client.errors import error_from_envelope
from maof_client.models import Agent, Run, Tokens, shown

BASE = "http://maof.test"
Answer = tuple[int, Any] | tuple[int, Any, dict[str, str]] | Exception
Handler = Callable[[requests.PreparedRequest], Answer]


class FakeApi(BaseAdapter):
    """A requests transport answering from a table of (method, path) -> handler."""

    def __init__(self) -> None:
        super().__init__()
        self.routes: dict[tuple[str, str], Handler] = {}
        self.sent: list[requests.PreparedRequest] = []

    def on(self, method: str, path: str, handler: Handler | Answer) -> None:
        self.routes[(method, path)] = handler if callable(handler) else (lambda _r: handler)

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        self.sent.append(request)
        path = urlparse(request.url).path
        answer = self.routes[(str(request.method), path)](request)
        if isinstance(answer, Exception):
            raise answer
        status, body, *rest = answer
        response = requests.Response()
        response.status_code = status
        response._content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response.headers.update({"Content-Type": "application/json", **(rest[0] if rest else {})})
        response.url = str(request.url)
        response.request = request
        return response

    def close(self) -> None:
        pass

    def paths(self) -> list[str]:
        return [f"{r.method} {urlparse(r.url).path}" for r in self.sent]


def ok(data: Any, status: int = 200) -> tuple[int, Any]:
    return status, {"success": True, "data": data}


def failure(status: int, code: str, message: str, **extra: Any) -> tuple[int, Any]:
    return status, {
        "success": False,
        "error": {"code": code, "message": message, "requestId": "req-1", **extra},
    }


def jwt_with_expiry(expires: float, marker: str = "a") -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256'})}.{part({'exp': int(expires), 'm': marker})}.sig"


def valid_token(marker: str = "a") -> str:
    return jwt_with_expiry(time.time() + 600, marker)


def signed_in(access: str, refresh: str) -> dict[str, Any]:
    user = {"userUuid": "u-1", "email": "ada@example.com", "name": "Ada", "role": "user"}
    return {"accessToken": access, "refreshToken": refresh, "user": user}


@pytest.fixture
def fake() -> FakeApi:
    return FakeApi()


def client_for(fake: FakeApi, tokens: Tokens | None = None) -> MaofClient:
    session = requests.Session()
    session.mount(BASE, fake)
    return MaofClient(BASE, tokens=MemoryTokenStore(tokens), session=session)


RUN = {
    "workflowRunId": "wfr-1",
    "workflowName": "p",
    "status": "failed",
    "progress": {"total": 2, "completed": 1, "failed": 1, "current": None},
    "createdAt": "2026-01-02T03:04:05+00:00",
    "startedAt": None,
    "completedAt": None,
    "errorMessage": "Stage 'b' failed: boom",
    "deadlineAt": None,
    "input": {"text": "x"},
    "callback": None,
    "stages": [
        {"stageId": "a", "name": "A", "status": "completed", "durationMs": 12, "attempt": 1},
        {"stageId": "b", "name": "B", "status": "failed", "errorMessage": "boom"},
    ],
}


# ------------------------------------------------------------------ the envelope's errors


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("VALIDATION_ERROR", 400, errors.ValidationError),
        ("BAD_REQUEST", 400, errors.BadRequest),
        ("UNAUTHORIZED", 401, errors.Unauthorized),
        ("FORBIDDEN", 403, errors.Forbidden),
        ("NOT_FOUND", 404, errors.NotFound),
        ("METHOD_NOT_ALLOWED", 405, errors.MethodNotAllowed),
        ("CONFLICT", 409, errors.Conflict),
        ("PAYLOAD_TOO_LARGE", 413, errors.PayloadTooLarge),
        ("UNSUPPORTED_MEDIA_TYPE", 415, errors.UnsupportedMediaType),
        ("RATE_LIMITED", 429, errors.RateLimited),
        ("SERVICE_UNAVAILABLE", 503, errors.ServiceUnavailable),
        ("INTERNAL_ERROR", 500, errors.InternalError),
    ],
)
def test_each_error_code_is_its_own_exception(code: str, status: int, kind: type) -> None:
    error = error_from_envelope(failure(status, code, "what happened")[1], status)
    assert type(error) is kind
    assert isinstance(error, errors.MaofError)
    assert (error.code, error.message, error.request_id, error.status) == (
        code,
        "what happened",
        "req-1",
        status,
    )


def test_an_unknown_code_is_still_a_maof_error_with_that_code() -> None:
    error = error_from_envelope(failure(418, "TEAPOT", "short and stout")[1], 418)
    assert type(error) is errors.MaofError
    assert error.code == "TEAPOT"
    assert str(error) == "TEAPOT: short and stout (request id req-1)"


def test_validation_details_are_kept() -> None:
    details = [{"field": "workflow.stages.0.id", "message": "is required"}]
    error = error_from_envelope(
        failure(400, "VALIDATION_ERROR", "Invalid", details=details)[1], 400
    )
    assert error.details == details


def test_rate_limited_says_how_long_to_wait() -> None:
    body = failure(429, "RATE_LIMITED", "slow down", details={"retryAfterSeconds": 7})[1]
    error = error_from_envelope(body, 429, retry_after_header="9")
    assert isinstance(error, errors.RateLimited)
    assert error.retry_after == 7
    no_details = error_from_envelope(failure(429, "RATE_LIMITED", "slow")[1], 429, "9")
    assert isinstance(no_details, errors.RateLimited)
    assert no_details.retry_after == 9


def test_service_unavailable_says_how_long_to_wait_as_rate_limited_does() -> None:
    """The API answers every 503 with Retry-After: it was read for a 429 only, so a 503's
    error said nothing of when to try again."""
    from maof_client.cli import explain

    error = error_from_envelope(failure(503, "SERVICE_UNAVAILABLE", "busy")[1], 503, "7")
    assert isinstance(error, errors.ServiceUnavailable)
    assert error.retry_after == 7
    assert "  retry after 7 s" in explain(error, BASE).splitlines()
    silent = error_from_envelope(failure(503, "SERVICE_UNAVAILABLE", "busy")[1], 503)
    assert isinstance(silent, errors.ServiceUnavailable) and silent.retry_after is None
    assert "retry after" not in explain(silent, BASE)


def test_a_body_without_the_envelope_is_an_unexpected_response() -> None:
    error = error_from_envelope({"message": "Forbidden"}, 403)
    assert isinstance(error, errors.UnexpectedResponse)
    assert error.status == 403


def test_the_client_raises_the_envelope_error_with_its_request_id(fake: FakeApi) -> None:
    fake.on("GET", "/workflows/wfr-x", failure(404, "NOT_FOUND", "Workflow run not found"))
    client = client_for(fake, Tokens(valid_token(), "r1"))
    with pytest.raises(errors.NotFound) as caught:
        client.get_run("wfr-x")
    assert caught.value.request_id == "req-1"
    assert caught.value.status == 404


def test_the_request_id_header_stands_in_when_the_body_has_none(fake: FakeApi) -> None:
    body = {"success": False, "error": {"code": "INTERNAL_ERROR", "message": "oops"}}
    fake.on("GET", "/health", (500, body, {"X-Request-Id": "from-header"}))
    with pytest.raises(errors.InternalError) as caught:
        client_for(fake).health()
    assert caught.value.request_id == "from-header"


def test_an_answer_that_is_not_json_is_an_unexpected_response(fake: FakeApi) -> None:
    fake.on("GET", "/health", (502, b"<html>Bad gateway</html>"))
    with pytest.raises(errors.UnexpectedResponse, match="HTTP 502"):
        client_for(fake).health()


def test_a_degraded_health_is_answered_not_raised(fake: FakeApi) -> None:
    data = {"status": "degraded", "services": {"database": "connected", "redis": "disconnected"}}
    body = {
        "success": False,
        "data": data,
        "error": {"code": "SERVICE_UNAVAILABLE", "message": "Degraded", "requestId": "r"},
    }
    fake.on("GET", "/health", (503, body))
    report = client_for(fake).health()
    assert not report.ok
    assert report.services["redis"] == "disconnected"


def test_an_unreachable_api_is_a_connection_error_naming_the_url() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nothing listens
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(errors.ConnectionFailed) as caught:
        MaofClient(url, timeout=2).health()
    assert url in caught.value.message
    assert "refused" in caught.value.message.lower()


def test_results_are_typed(fake: FakeApi) -> None:
    fake.on("GET", "/workflows/wfr-1", ok(RUN))
    run = client_for(fake, Tokens(valid_token(), "r1")).get_run("wfr-1")
    assert isinstance(run, Run)
    assert run.ended and run.status == "failed"
    assert run.created_at is not None and run.created_at.year == 2026
    assert [s.stage_id for s in run.failed_stages] == ["b"]
    assert run.stages[0].duration_ms == 12
    assert run.raw == RUN  # --json prints exactly this


def test_a_cancel_answer_names_the_stages_it_ended(fake: FakeApi) -> None:
    """The API answers `stagesCancelled` as a list of stage ids, as it does
    `stagesRequeued` (it was read as a number, always None)."""
    answer = {"workflowRunId": "wfr-1", "status": "cancelled", "stagesCancelled": ["b", "c"]}
    fake.on("POST", "/workflows/wfr-1/cancel", ok(answer))
    cancelled = client_for(fake, Tokens(valid_token(), "r1")).cancel_run("wfr-1")
    assert cancelled.stages_cancelled == ["b", "c"]
    assert cancelled.raw == answer  # --json prints exactly this


def test_path_parameters_stay_one_segment(fake: FakeApi) -> None:
    fake.on("GET", "/workflows/..%2Fagents", failure(404, "NOT_FOUND", "no"))
    with pytest.raises(errors.NotFound):
        client_for(fake, Tokens(valid_token(), "r1")).get_run("../agents")


def test_without_tokens_a_protected_call_says_sign_in(fake: FakeApi) -> None:
    with pytest.raises(errors.NotSignedIn, match=r"Not signed in to http://maof\.test"):
        client_for(fake).list_runs()
    assert fake.sent == []


# ------------------------------------------------------------------ refreshing tokens


def test_a_refused_access_token_is_refreshed_once_and_the_request_sent_again(
    fake: FakeApi,
) -> None:
    old, new = valid_token("old"), valid_token("new")
    seen: list[str] = []

    def runs(request: requests.PreparedRequest) -> Answer:
        seen.append(str(request.headers["Authorization"]))
        if request.headers["Authorization"] == f"Bearer {new}":
            return ok({"runs": [], "meta": {"total": 0, "page": 1, "limit": 20, "pages": 0}})
        return failure(401, "UNAUTHORIZED", "Session has ended")

    refreshes: list[Any] = []

    def refresh(request: requests.PreparedRequest) -> Answer:
        refreshes.append(json.loads(request.body or b"{}"))
        return ok(signed_in(new, "r2"))

    fake.on("GET", "/workflows", runs)
    fake.on("POST", "/auth/refresh", refresh)
    client = client_for(fake, Tokens(old, "r1", "ada@example.com"))
    assert client.list_runs().runs == []
    assert seen == [f"Bearer {old}", f"Bearer {new}"]
    assert refreshes == [{"refreshToken": "r1"}]
    assert client.tokens.load() == Tokens(new, "r2", "ada@example.com")


def test_an_expired_access_token_is_refreshed_before_it_is_sent(fake: FakeApi) -> None:
    expired = jwt_with_expiry(time.time() - 30)
    fresh = valid_token("fresh")
    fake.on("POST", "/auth/refresh", ok(signed_in(fresh, "r2")))
    fake.on("GET", "/auth/me", ok(signed_in(fresh, "r2")["user"]))
    client = client_for(fake, Tokens(expired, "r1"))
    assert client.me().email == "ada@example.com"
    assert fake.paths() == ["POST /auth/refresh", "GET /auth/me"]
    assert fake.sent[1].headers["Authorization"] == f"Bearer {fresh}"


def test_a_refused_refresh_forgets_the_tokens_and_says_sign_in(fake: FakeApi) -> None:
    fake.on("GET", "/workflows", failure(401, "UNAUTHORIZED", "Token has expired"))
    fake.on("POST", "/auth/refresh", failure(401, "UNAUTHORIZED", "Session has ended"))
    client = client_for(fake, Tokens(valid_token(), "r1"))
    with pytest.raises(errors.NotSignedIn, match="has ended"):
        client.list_runs()
    assert client.tokens.load() is None
    assert fake.paths() == ["GET /workflows", "POST /auth/refresh"]  # refreshed once only


def test_a_second_401_after_the_refresh_is_raised(fake: FakeApi) -> None:
    fake.on("GET", "/workflows", failure(401, "UNAUTHORIZED", "Invalid token"))
    fake.on("POST", "/auth/refresh", ok(signed_in(valid_token("n"), "r2")))
    with pytest.raises(errors.Unauthorized):
        client_for(fake, Tokens(valid_token(), "r1")).list_runs()
    assert fake.paths() == ["GET /workflows", "POST /auth/refresh", "GET /workflows"]


def test_tokens_rotated_meanwhile_are_used_without_refreshing_again(fake: FakeApi) -> None:
    """Another process refreshed first: presenting our (now retired) refresh token would end
    the session, so the newer pair in the store is used instead."""
    newer = valid_token("newer")
    fake.on("GET", "/auth/me", ok(signed_in(newer, "r2")["user"]))
    store = MemoryTokenStore(Tokens(newer, "r2"))
    session = requests.Session()
    session.mount(BASE, fake)
    client = MaofClient(BASE, tokens=store, session=session)
    stale = Tokens(jwt_with_expiry(time.time() - 30), "r1")
    assert client._refresh(stale) == Tokens(newer, "r2")
    assert fake.paths() == []


def test_a_wrong_current_password_does_not_refresh(fake: FakeApi) -> None:
    fake.on("POST", "/auth/password", failure(401, "UNAUTHORIZED", "Invalid email or password"))
    tokens = Tokens(valid_token(), "r1")
    client = client_for(fake, tokens)
    with pytest.raises(errors.Unauthorized):
        client.change_password("wrong", "new-password-1")
    assert fake.paths() == ["POST /auth/password"]
    assert client.tokens.load() == tokens


def test_login_stores_the_pair_and_its_result_holds_no_token(fake: FakeApi) -> None:
    access = valid_token()
    fake.on("POST", "/auth/login", ok(signed_in(access, "r1")))
    client = client_for(fake)
    signed = client.login("ada@example.com", "pw")
    assert client.tokens.load() == Tokens(access, "r1", "ada@example.com")
    assert access not in json.dumps(signed.raw) and "r1" not in json.dumps(signed.raw)
    assert access not in repr(signed)


def test_access_token_expiry_reads_exp_and_tolerates_anything_else() -> None:
    assert access_token_expiry(jwt_with_expiry(1234)) == 1234
    assert access_token_expiry("not-a-jwt") is None
    assert access_token_expiry("a.!!!.c") is None


# ------------------------------------------------------------------ submissions


def test_a_keyed_submission_is_sent_again_after_a_timeout_with_the_same_key(
    fake: FakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(time, "sleep", lambda _s: None)
    answers: list[Answer] = [
        requests.ReadTimeout("slow"),
        ok({"workflowRunId": "wfr-1", "status": "queued"}, 202),
    ]
    fake.on("POST", "/workflows/execute", lambda _r: answers.pop(0))
    client = client_for(fake, Tokens(valid_token(), "r1"))
    submitted = client.execute({"name": "p", "stages": []}, {"x": 1}, idempotency_key="k-1")
    assert submitted.workflow_run_id == "wfr-1"
    keys = [r.headers["Idempotency-Key"] for r in fake.sent]
    assert keys == ["k-1", "k-1"]
    assert json.loads(fake.sent[0].body or b"{}") == {
        "workflow": {"name": "p", "stages": []},
        "input": {"x": 1},
    }


def test_an_unkeyed_submission_is_never_sent_twice(fake: FakeApi) -> None:
    fake.on("POST", "/workflows/execute", requests.ReadTimeout("slow"))
    with pytest.raises(errors.ConnectionFailed, match="did not answer"):
        client_for(fake, Tokens(valid_token(), "r1")).execute({"name": "p", "stages": []})
    assert len(fake.sent) == 1


def test_wait_for_run_polls_until_the_run_ends(
    fake: FakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(time, "sleep", lambda _s: None)
    states = [{**RUN, "status": "queued"}, {**RUN, "status": "in_progress"}, RUN]
    fake.on("GET", "/workflows/wfr-1", lambda _r: ok(states.pop(0)))
    updates: list[str] = []
    run = client_for(fake, Tokens(valid_token(), "r1")).wait_for_run(
        "wfr-1", on_update=lambda r: updates.append(r.status)
    )
    assert run.status == "failed"
    assert updates == ["queued", "in_progress", "failed"]


class FakeClock:
    """The client's `time`: sleeping moves the monotonic clock on at once."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    from maof_client import client as client_module

    fake_clock = FakeClock()
    monkeypatch.setattr(client_module, "time", fake_clock)
    return fake_clock


def test_wait_for_run_outlasts_polls_that_fail_while_the_api_is_away(
    fake: FakeApi, clock: FakeClock
) -> None:
    """A restart behind a proxy (502), a 503 asking for 3 s, a refused connection: the run
    goes on meanwhile, so the watch must too (it gave up on the first failed poll)."""
    unavailable = failure(503, "SERVICE_UNAVAILABLE", "Database unreachable")
    answers: list[Answer] = [
        ok({**RUN, "status": "in_progress"}),
        (502, b"<html>502 Bad Gateway</html>"),
        (*unavailable, {"Retry-After": "3"}),
        requests.ConnectionError("[Errno 111] Connection refused"),
        ok(RUN),
    ]
    fake.on("GET", "/workflows/wfr-1", lambda _r: answers.pop(0))
    retries: list[tuple[str, float]] = []
    run = client_for(fake, Tokens(valid_token(), "r1")).wait_for_run(
        "wfr-1", on_retry=lambda error, delay: retries.append((error.code, delay))
    )
    assert run.status == "failed"
    assert retries == [
        ("UNEXPECTED_RESPONSE", 1.0),
        ("SERVICE_UNAVAILABLE", 3.0),  # the Retry-After, not the backoff
        ("CONNECTION_FAILED", 4.0),
    ]
    assert clock.slept[1:] == [1.0, 3.0, 4.0]


def test_wait_for_run_gives_up_after_a_minute_of_failed_polls(
    fake: FakeApi, clock: FakeClock
) -> None:
    fake.on("GET", "/workflows/wfr-1", requests.ConnectionError("[Errno 111] refused"))
    started = clock.now
    with pytest.raises(errors.ConnectionFailed):
        client_for(fake, Tokens(valid_token(), "r1")).wait_for_run("wfr-1")
    assert clock.slept == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0, 10.0]  # 55 s; 10 more: 65
    assert clock.now - started <= 60


@pytest.mark.parametrize(
    "answer",
    [
        failure(404, "NOT_FOUND", "Workflow run not found"),
        failure(500, "INTERNAL_ERROR", "oops"),  # the API's own: asking again will not help
        (200, {"success": True, "data": []}),
    ],
    ids=["404", "500", "not-maof"],
)
def test_wait_for_run_raises_an_error_that_waiting_will_not_mend_at_once(
    fake: FakeApi, clock: FakeClock, answer: Answer
) -> None:
    fake.on("GET", "/workflows/wfr-1", answer)
    with pytest.raises(errors.MaofError):
        client_for(fake, Tokens(valid_token(), "r1")).wait_for_run("wfr-1")
    assert len(fake.sent) == 1 and clock.slept == []


def test_export_audit_calls_the_export_path(fake: FakeApi) -> None:
    fake.on("GET", "/workflows/wfr-1/audit/export", failure(404, "NOT_FOUND", "Not found"))
    with pytest.raises(errors.NotFound):
        client_for(fake, Tokens(valid_token(), "r1")).export_audit("wfr-1")


# ------------------------------------------------------------------ what reaches a terminal

# An agent's words (through a shared agent's name, or text MAOF takes from an answer)
# carrying what a terminal acts on: set the window title, clear the screen (ESC and C1).
HOSTILE = "ok\x1b]0;pwned\x07\x1b[2J\x9b2J\x7fend"


def test_strings_a_person_reads_carry_no_escape_codes() -> None:
    import io

    from rich.console import Console

    from maof_client import render

    data = {
        **RUN,
        "errorMessage": HOSTILE,
        "stages": [{**RUN["stages"][1], "agentId": HOSTILE, "errorMessage": HOSTILE}],
    }
    run = Run.from_api(data)
    assert run.error_message == "ok?]0;pwned??[2J?2J?end"
    assert run.raw["errorMessage"] == HOSTILE  # the API's own data is kept as it came
    out = io.StringIO()
    Console(file=out, force_terminal=True, width=200).print(render.run_view(run))
    printed = out.getvalue() + render.failure_summary(run)
    assert "pwned" in printed and "\x1b]" not in printed and "\x1b[2J" not in printed
    assert not any(ch in printed for ch in "\x07\x7f\x9b")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\u202eevil.exe", "?evil.exe"),  # RIGHT-TO-LEFT OVERRIDE: shown reversed
        ("\u2066isolated\u2069", "?isolated?"),  # LEFT-TO-RIGHT ISOLATE ... POP ISOLATE
        ("zero\u200bwidth\ufeff", "zero?width?"),  # ZERO WIDTH SPACE, BOM
        ("line\u2028para\u2029end", "line?para?end"),  # LINE and PARAGRAPH SEPARATOR
        ("kept:\ttab\nnewline é 要約 ✓\xa0", "kept:\ttab\nnewline é 要約 ✓\xa0"),
    ],
    ids=["rlo", "isolates", "zero-width", "separators", "printable"],
)
def test_format_characters_and_separators_are_shown_as_question_marks(
    text: str, expected: str
) -> None:
    """Unicode format (bidi, zero-width) and separator characters change how the text
    around them is shown ("Trojan Source"): a shared agent's name could pass for another."""
    assert shown(text) == expected
    agent = Agent.from_api({"agentUuid": "u", "agentId": text, "name": text})
    assert (agent.agent_id, agent.name) == (expected, expected)
    assert agent.raw["name"] == text


def test_json_for_a_terminal_escapes_what_json_leaves_raw(capsys) -> None:
    from maof_client.cli import emit_json

    hostile = HOSTILE + " \u202eevil \u2028 \u200b \U000e0041 é"  # bidi, separator, tags
    emit_json({"output": hostile, "lines": "a\nb\tc"})
    printed = capsys.readouterr().out
    assert json.loads(printed) == {"output": hostile, "lines": "a\nb\tc"}  # the same data
    assert not any(ch in printed for ch in "\x1b\x07\x7f\x9b\u202e\u2028\u200b\U000e0041")
    assert "é" in printed and "\\udb40\\udc41" in printed


def test_a_lone_surrogate_from_the_api_is_printed_escaped(capsys) -> None:
    """JSON's "\\ud800" reads as a lone surrogate, which no encoding writes: printing the
    result (or any --json) was a UnicodeEncodeError traceback."""
    from maof_client.cli import emit_json

    data = {"output": "a\ud800b", "pair": "\U0001f600"}
    emit_json(data)
    printed = capsys.readouterr().out
    assert "a\\ud800b" in printed and "\U0001f600" in printed  # what encodes stays itself
    assert json.loads(printed) == data
    agent = Agent.from_api({"agentUuid": "u", "agentId": "a", "name": "x\udc80y"})
    assert agent.name == "x?y"


# ------------------------------------------------------------------ what the transport refuses


def test_a_redirect_is_not_followed_with_the_password_and_names_its_location(
    fake: FakeApi,
) -> None:
    """A 307/308 asks for the same POST, body and all, at its Location: followed, the
    password (or a refresh token) would go to whatever host it names."""
    elsewhere = FakeApi()
    elsewhere.on("POST", "/auth/login", ok(signed_in(valid_token(), "r1")))
    fake.on("POST", "/auth/login", (307, b"", {"Location": "http://elsewhere.test/auth/login"}))
    client = client_for(fake)
    client._http.mount("http://elsewhere.test", elsewhere)
    with pytest.raises(errors.UnexpectedResponse) as caught:
        client.login("ada@example.com", "s3cret-password")
    assert "http://elsewhere.test/auth/login" in caught.value.message
    assert caught.value.status == 307
    assert elsewhere.sent == []
    assert client.tokens.load() is None


@pytest.mark.parametrize("status", [301, 302, 303, 308])
def test_every_redirect_is_an_unexpected_response(fake: FakeApi, status: int) -> None:
    fake.on("GET", "/auth/me", (status, b"", {"Location": "/auth/me"}))  # a loop, followed
    with pytest.raises(errors.UnexpectedResponse, match=f"HTTP {status}, a redirect to /auth/me"):
        client_for(fake, Tokens(valid_token(), "r1")).me()
    assert fake.paths() == ["GET /auth/me"]


@pytest.mark.parametrize(
    "failure",
    [
        requests.exceptions.ChunkedEncodingError("Connection broken: IncompleteRead"),
        requests.exceptions.ContentDecodingError("Received response with content-encoding: gzip"),
        requests.exceptions.InvalidHeader("Invalid leading whitespace"),
    ],
    ids=type,
)
def test_other_transport_failures_are_request_failed(
    fake: FakeApi, failure: requests.RequestException
) -> None:
    fake.on("GET", "/health", failure)
    with pytest.raises(errors.RequestFailed) as caught:
        client_for(fake).health()
    assert "GET /health" in caught.value.message and type(failure).__name__ in caught.value.message
    assert isinstance(caught.value, errors.MaofError)


@pytest.mark.parametrize("url", ["localhost:3000", "api.example.com", "ftp://api.example.com"])
def test_a_url_requests_cannot_use_is_request_failed_naming_it(url: str) -> None:
    with pytest.raises(errors.RequestFailed, match="GET /health"):
        MaofClient(url, timeout=2).health()


def test_a_body_that_is_not_json_is_request_failed_and_not_sent(fake: FakeApi) -> None:
    client = client_for(fake, Tokens(valid_token(), "r1"))
    with pytest.raises(errors.RequestFailed, match="InvalidJSONError"):
        client.execute({"name": "p", "stages": []}, {"x": float("nan")})
    assert fake.sent == []


# ------------------------------------------------------------------ answers that are not MAOF's


@pytest.mark.parametrize(
    "envelope",
    [
        {"success": True},
        {"success": True, "data": None},
        {"success": True, "data": []},
        {"success": True, "data": "ok"},
    ],
    ids=["no data", "null", "list", "string"],
)
def test_a_success_without_object_data_is_an_unexpected_response(
    fake: FakeApi, envelope: dict[str, Any]
) -> None:
    fake.on("GET", "/auth/me", (200, envelope))
    fake.on("GET", "/health", (200, envelope))
    fake.on("GET", "/stats", (200, envelope))
    client = client_for(fake, Tokens(valid_token(), "r1"))
    for call in (client.me, client.health, client.stats):
        with pytest.raises(errors.UnexpectedResponse, match="is this a MAOF API"):
            call()


@pytest.mark.parametrize(
    ("path", "call", "data"),
    [
        ("/auth/me", "me", {"email": "ada@example.com"}),  # no userUuid
        ("/agents/a-1", "get_agent", {"agentUuid": "a-1", "agentId": "a", "capabilities": 5}),
        ("/workflows/wfr-1", "get_run", {**RUN, "progress": ["1/2"]}),
        ("/workflows/wfr-1", "get_run", {**RUN, "stages": [{"stageId": "a"}, "b"]}),
        ("/workflows/wfr-1/audit", "get_audit", {"workflowRunId": "wfr-1", "logs": [{}]}),
    ],
    ids=[
        "missing field",
        "capabilities not a list",
        "progress a list",
        "stage a string",
        "entry without seq",
    ],
)
def test_data_of_another_shape_is_an_unexpected_response(
    fake: FakeApi, path: str, call: str, data: dict[str, Any]
) -> None:
    fake.on("GET", path, ok(data))
    client = client_for(fake, Tokens(valid_token(), "r1"))
    argument = path.split("/")[2] if call != "me" else None
    with pytest.raises(errors.UnexpectedResponse, match=f"GET {path}"):
        getattr(client, call)(*([argument] if argument else []))


STATS = {
    "window": "1 hour",
    "runs": {"completed": 2, "failed": 1},
    "stages": {"completed": 5},
    "agents": [
        {
            "agentUuid": "a-1",
            "agentId": "summarizer",
            "completed": 5,
            "failed": 0,
            "stageP50Ms": 120,
            "stageP95Ms": 480,
        }
    ],
}


@pytest.mark.parametrize(
    "data",
    [
        {"runs": {}},  # no window, stages or agents
        {**STATS, "runs": [["completed", 2]]},
        {**STATS, "agents": ["summarizer"]},
        {**STATS, "agents": [{**STATS["agents"][0], "completed": "many"}]},
    ],
    ids=["missing fields", "runs a list", "agent a string", "count not a number"],
)
def test_stats_of_another_shape_is_an_unexpected_response(
    fake: FakeApi, data: dict[str, Any]
) -> None:
    """`maof stats` read the answer as a plain dict: a KeyError traceback on any other."""
    fake.on("GET", "/stats", ok(data))
    with pytest.raises(errors.UnexpectedResponse, match="GET /stats"):
        client_for(fake, Tokens(valid_token(), "r1")).stats()


def test_stats_are_typed(fake: FakeApi) -> None:
    fake.on("GET", "/stats", ok(STATS))
    stats = client_for(fake, Tokens(valid_token(), "r1")).stats()
    assert (stats.window, stats.runs, stats.stages) == (
        "1 hour",
        {"completed": 2, "failed": 1},
        {"completed": 5},
    )
    [agent] = stats.agents
    assert (agent.agent_id, agent.completed, agent.stage_p50_ms) == ("summarizer", 5, 120)
    assert stats.raw == STATS  # --json prints exactly this


def test_a_sign_in_without_tokens_is_an_unexpected_response_and_stores_nothing(
    fake: FakeApi,
) -> None:
    fake.on("POST", "/auth/login", ok({"user": signed_in("a", "r")["user"]}))
    client = client_for(fake)
    with pytest.raises(errors.UnexpectedResponse, match="no 'accessToken'"):
        client.login("ada@example.com", "pw")
    assert client.tokens.load() is None


def test_agent_fields_show_no_escape_codes() -> None:
    import io

    from rich.console import Console

    from maof_client import render

    raw = {"name": HOSTILE, "capabilities": [HOSTILE, "x"], HOSTILE: "key", "endpoint": None}
    out = io.StringIO()
    Console(file=out, force_terminal=True, width=200).print(render.agent_fields(raw))
    printed = out.getvalue()
    assert "pwned" in printed and "\x1b]" not in printed and "\x1b[2J" not in printed
    assert not any(ch in printed for ch in "\x07\x7f\x9b")
