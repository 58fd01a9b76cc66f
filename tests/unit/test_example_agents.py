"""The example agents: the text capabilities, and the OpenAI-compatible adapter against a
local fake chat-completions server."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests

from examples.agents import server as example
from examples.agents.openai_adapter import ChatCompletions
from examples.agents.protocol import TaskError, find_text, serve


def test_extract_translate_summarize_chain():
    points = example.agent("extraction", {"text": "The agent routes the text. It is fast!"}, {})
    assert points["points"] == ["The agent routes the text", "It is fast"]
    spanish = example.agent("translation", {"text": points["text"], "targetLanguage": "es"}, {})
    assert spanish["text"].startswith("El agente dirige el texto")
    summary = example.agent("summarization", {"translate": spanish}, {})
    assert summary["summary"] == spanish["text"]


def test_unknown_capability_and_language_are_protocol_errors():
    with pytest.raises(TaskError):
        example.agent("painting", {"text": "x"}, {})
    with pytest.raises(TaskError):
        example.agent("translation", {"text": "x", "targetLanguage": "fr"}, {})


def test_find_text_looks_through_dependency_outputs():
    assert find_text({"step-1": {"points": ["a"], "text": "hello"}}) == "hello"


class FakeChat:
    """A chat-completions endpoint that answers from a script and records requests."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.status = 200
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(
                    {"path": self.path, "auth": self.headers["Authorization"], "body": body}
                )
                answer = json.dumps(
                    {
                        "model": body["model"],
                        "choices": [{"message": {"role": "assistant", "content": "hola"}}],
                    }
                ).encode()
                self.send_response(fake.status)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"


@pytest.fixture
def adapter():
    fake = FakeChat()
    chat = ChatCompletions(fake.base_url, "sk-test", "tiny-model", timeout=5)
    agent = serve(chat, "127.0.0.1", 0, "/agent", "adapter-token")
    yield fake, f"http://127.0.0.1:{agent.server_address[1]}/agent"
    agent.shutdown()
    fake.server.shutdown()


def post(url: str, token: str = "adapter-token") -> dict[str, Any]:
    task = {
        "workflowRunId": "wfr-1",
        "stageId": "s",
        "capability": "translation",
        "input": {"text": "hello"},
        "context": {"workflowName": "w", "previousStages": [], "deadlineMs": 5000},
    }
    response = requests.post(
        url,
        json=task,
        headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "wfr-1:s:1"},
        timeout=10,
    )
    return {"httpStatus": response.status_code, **response.json()}


def test_adapter_forwards_the_stage_to_chat_completions(adapter):
    fake, url = adapter
    answer = post(url)
    assert answer == {
        "httpStatus": 200,
        "status": "success",
        "output": {"text": "hola", "model": "tiny-model"},
    }
    [request] = fake.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["auth"] == "Bearer sk-test"
    assert request["body"]["model"] == "tiny-model"
    assert "translation" in request["body"]["messages"][-1]["content"]
    assert '"hello"' in request["body"]["messages"][-1]["content"]


def test_adapter_answers_upstream_429_as_retryable(adapter):
    fake, url = adapter
    fake.status = 429
    answer = post(url)
    assert answer["status"] == "error" and answer["retryable"] is True


def test_adapter_refuses_a_wrong_token(adapter):
    _, url = adapter
    assert post(url, token="wrong")["httpStatus"] == 401


def test_the_protocol_server_answers_keep_alive_requests_without_waiting_for_an_ack():
    # Headers and body written apart, with Nagle's algorithm on, wait ~40 ms each for the
    # client's delayed ACK: an agent that answers at once would look 40 ms slow.
    agent = serve(lambda capability, data, context: {"ok": True}, "127.0.0.1", 0, "/agent", "t")
    url = f"http://127.0.0.1:{agent.server_address[1]}/agent"
    times = []
    try:
        with requests.Session() as http:
            for index in range(12):
                started = time.perf_counter()
                response = http.post(
                    url,
                    json={"capability": "c", "input": {}, "stageId": f"s{index}"},
                    headers={"Authorization": "Bearer t", "Idempotency-Key": f"k{index}"},
                    timeout=5,
                )
                assert response.json() == {"status": "success", "output": {"ok": True}}
                times.append(time.perf_counter() - started)  # the body read too
    finally:
        agent.shutdown()
        agent.server_close()
    assert sorted(times)[len(times) // 2] < 0.02, times


def _post_task(url: str, key: str) -> Any:
    response = requests.post(
        url,
        json={"capability": "c", "input": {}},
        headers={"Authorization": "Bearer t", "Idempotency-Key": key},
        timeout=10,
    )
    return response.status_code, response.json()


def test_a_retry_arriving_while_the_attempt_is_worked_on_gets_its_answer_not_a_second_run():
    """MAOF retries under the same Idempotency-Key after a timeout, while the agent may
    still be working on the first request: the example server waits for that answer."""
    calls: list[float] = []
    started = threading.Event()

    def slow(capability: str, data: Any, context: dict[str, Any]) -> Any:
        calls.append(time.monotonic())
        started.set()
        time.sleep(0.5)
        return {"call": len(calls)}

    agent = serve(slow, "127.0.0.1", 0, "/agent", "t")
    url = f"http://127.0.0.1:{agent.server_address[1]}/agent"
    try:
        answers: list[Any] = []
        first = threading.Thread(target=lambda: answers.append(_post_task(url, "run:a:1")))
        first.start()
        assert started.wait(5)
        answers.append(_post_task(url, "run:a:1"))  # the retry, mid-work
        first.join(10)
        answers.append(_post_task(url, "run:a:1"))  # a later redelivery
        answers.append(_post_task(url, "run:a:2"))  # the next attempt: new work
    finally:
        agent.shutdown()
        agent.server_close()
    assert len(calls) == 2, calls
    success = (200, {"status": "success", "output": {"call": 1}})
    assert answers == [success, success, success, (200, {**success[1], "output": {"call": 2}})]


def test_an_agent_function_that_raises_answers_500_and_is_not_remembered():
    outcomes = iter([RuntimeError("bug"), {"ok": True}])

    def flaky(capability: str, data: Any, context: dict[str, Any]) -> Any:
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    agent = serve(flaky, "127.0.0.1", 0, "/agent", "t")
    url = f"http://127.0.0.1:{agent.server_address[1]}/agent"
    try:
        failed, retried = _post_task(url, "run:a:1"), _post_task(url, "run:a:1")
    finally:
        agent.shutdown()
        agent.server_close()
    assert failed == (
        500,
        {"status": "error", "code": "AGENT_FAILED", "message": "RuntimeError", "retryable": True},
    )
    assert retried == (200, {"status": "success", "output": {"ok": True}})


def test_the_protocol_server_serves_an_endpoint_with_a_query_string():
    """docs/protocol.md lets an endpoint carry a query (health probed with it kept): the
    example answered 404 to both, comparing the path with its query."""
    agent = serve(lambda capability, data, context: {"ok": True}, "127.0.0.1", 0, "/agent", "t")
    base = f"http://127.0.0.1:{agent.server_address[1]}/agent"
    try:
        task = requests.post(
            f"{base}?tenant=acme",
            json={"capability": "c", "input": {}},
            headers={"Authorization": "Bearer t", "Idempotency-Key": "run:s:1"},
            timeout=5,
        )
        health = requests.get(f"{base}/health?tenant=acme", timeout=5)
    finally:
        agent.shutdown()
        agent.server_close()
    assert (task.status_code, task.json()) == (200, {"status": "success", "output": {"ok": True}})
    assert (health.status_code, health.json()) == (200, {"status": "healthy"})
