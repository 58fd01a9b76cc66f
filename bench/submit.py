"""submit and read: `POST /workflows/execute` and `GET /workflows/{id}`.

In process: the Chalice app called with API Gateway events, as Lambda calls it — the
handler's own time, what Lambda bills. The SQS send inside the submit (the network to
LocalStack) is timed on its own and reported separately; `handler excl. SQS` is the rest.

Over HTTP: the same app behind Chalice's local server (`devstack.api`, its own
process), one client in sequence for latency, several at once for throughput; and the
floor's one-route Chalice app behind the same server.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from bench.common import WORKFLOW_INPUT as INPUT
from bench.common import (
    InProcessApi,
    LambdaContext,
    linear3,
    rest_event,
    start_server,
    stop_server,
    submit,
    summary_ms,
)

PROJECT_DIR = Path(__file__).resolve().parents[1]


class SendTimer:
    """Wraps the submit's SQS send to time it apart from the rest of the handler."""

    def __init__(self) -> None:
        self.last = 0.0

    def __enter__(self) -> SendTimer:
        from chalicelib.workflows import runs

        self._runs = runs
        self._real = runs.send_stage_messages

        def timed_send(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return self._real(*args, **kwargs)
            finally:
                self.last = time.perf_counter() - started

        runs.send_stage_messages = timed_send  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        self._runs.send_stage_messages = self._real  # type: ignore[assignment]


def in_process(api: InProcessApi, iterations: int) -> dict[str, Any]:
    app = api.app
    body = {"workflow": linear3(), "input": INPUT}
    totals, sends, handler_only = [], [], []
    warmup = 30
    run_ids = []
    with SendTimer() as timer:
        for index in range(iterations + warmup):
            event = rest_event(
                "POST", "/workflows/execute", "/workflows/execute", None, body, api.token
            )
            timer.last = 0.0
            started = time.perf_counter()
            response = app(event, LambdaContext())
            elapsed = time.perf_counter() - started
            assert response["statusCode"] == 202, response
            if index < warmup:
                continue
            totals.append(elapsed)
            sends.append(timer.last)
            handler_only.append(elapsed - timer.last)
            if len(run_ids) < 50:
                import json

                run_ids.append(json.loads(response["body"])["data"]["workflowRunId"])
    reads = []
    for index in range(iterations + warmup):
        ref = run_ids[index % len(run_ids)]
        event = rest_event(
            "GET", f"/workflows/{ref}", "/workflows/{run_id}", {"run_id": ref}, None, api.token
        )
        started = time.perf_counter()
        response = app(event, LambdaContext())
        elapsed = time.perf_counter() - started
        assert response["statusCode"] == 200, response
        if index >= warmup:
            reads.append(elapsed)
    return {
        "execute_handler_total": summary_ms(totals),
        "execute_sqs_send": summary_ms(sends),
        "execute_handler_excl_sqs": summary_ms(handler_only),
        "get_run_handler": summary_ms(reads),
    }


def _sequential(url: str, method: str, body: Any, headers: dict[str, str], n: int) -> list[float]:
    import requests

    durations = []
    with requests.Session() as session:
        for index in range(n + 20):
            started = time.perf_counter()
            response = session.request(method, url, json=body, headers=headers, timeout=10)
            elapsed = time.perf_counter() - started
            assert response.status_code < 300, response.text
            if index >= 20:
                durations.append(elapsed)
    return durations


def _concurrent(
    url: str, method: str, body: Any, headers: dict[str, str], clients: int, seconds: float
) -> dict[str, Any]:
    import requests

    stop = time.monotonic() + seconds
    durations: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def client() -> None:
        mine = []
        with requests.Session() as session:
            while time.monotonic() < stop:
                started = time.perf_counter()
                response = session.request(method, url, json=body, headers=headers, timeout=10)
                mine.append(time.perf_counter() - started)
                if response.status_code >= 300:
                    with lock:
                        errors[0] += 1
        with lock:
            durations.extend(mine)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return {
        "clients": clients,
        "requests": len(durations),
        "errors": errors[0],
        "requests_per_s": round(len(durations) / elapsed, 1),
        "latency": summary_ms(durations),
    }


def over_http(
    api: InProcessApi, iterations: int, clients: int, seconds: float, nodelay: bool, logs: Path
) -> dict[str, Any]:
    """One server configuration: MAOF and the bare app, each behind Chalice's local server."""
    maof, base = start_server("maof", nodelay, logs)
    bare, bare_base = start_server("bare", nodelay, logs)
    try:
        bare_url = f"{bare_base}/"
        headers = {"Authorization": f"Bearer {api.token}"}
        body = {"workflow": linear3(), "input": INPUT}
        ref = f"wfr-{submit(api, linear3())}"
        result: dict[str, Any] = {
            "tcp_nodelay": nodelay,
            "execute_sequential": summary_ms(
                _sequential(f"{base}/workflows/execute", "POST", body, headers, iterations)
            ),
            "get_run_sequential": summary_ms(
                _sequential(f"{base}/workflows/{ref}", "GET", None, headers, iterations)
            ),
            "bare_route_sequential": summary_ms(_sequential(bare_url, "GET", None, {}, iterations)),
        }
        if clients > 0:
            result["execute_concurrent"] = _concurrent(
                f"{base}/workflows/execute", "POST", body, headers, clients, seconds
            )
            result["get_run_concurrent"] = _concurrent(
                f"{base}/workflows/{ref}", "GET", None, headers, clients, seconds
            )
            result["bare_route_concurrent"] = _concurrent(
                bare_url, "GET", None, {}, clients, seconds
            )
    finally:
        stop_server(maof)
        stop_server(bare)
    return result


def run(
    api: InProcessApi, iterations: int, clients: int, seconds: float, logs: Path
) -> dict[str, Any]:
    from bench.env import purge_queue

    print(f"submit: {iterations} submits and reads in process, then over HTTP")
    result: dict[str, Any] = {"in_process": in_process(api, iterations)}
    # Chalice's local server as it ships (Nagle on: ~40 ms a request, see bench/serve.py),
    # briefly; then with TCP_NODELAY, fully.
    result["http_as_shipped"] = over_http(api, min(iterations, 50), 0, 0, False, logs)
    result["http"] = over_http(api, iterations, clients, seconds, True, logs)
    purge_queue()
    return result
