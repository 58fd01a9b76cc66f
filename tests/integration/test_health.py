"""GET /health: every dependency checked, 503 when one is down, and an answer within 2 s."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime

import pytest
import redis

from chalicelib import __version__, aws, cache, db
from chalicelib.config import reset_settings
from tests.integration.conftest import Api, wait_until

SERVICES = ("database", "redis", "queue")
ALL_CONNECTED = dict.fromkeys(SERVICES, "connected")

# What each dependency's URL setting is, and how to forget clients built from it.
DEPENDENCY_SETTINGS: dict[str, tuple[str, Callable[[], None]]] = {
    "database": ("MAOF_DATABASE_URL", db.reset),
    "redis": ("MAOF_REDIS_URL", cache.reset),
    "queue": ("MAOF_AWS_ENDPOINT_URL", aws.reset),
}


def _forget_clients() -> None:
    reset_settings()
    for _, reset in DEPENDENCY_SETTINGS.values():
        reset()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _health_is_ok(api: Api) -> bool:
    response = api.get("/health")
    return response.status_code == 200 and response.json()["data"]["services"] == ALL_CONNECTED


@pytest.fixture
def point(api: Api) -> Iterator[Callable[[str, str], None]]:
    """`point("redis", url)`: the app uses `url` for that dependency until the test ends."""
    saved: dict[str, str | None] = {}

    def _point(service: str, url: str) -> None:
        name, _ = DEPENDENCY_SETTINGS[service]
        saved.setdefault(name, os.environ.get(name))
        os.environ[name] = url
        _forget_clients()

    try:
        yield _point
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _forget_clients()
        # Later tests start from a healthy stack, not from checks still hung on a fake server.
        wait_until(lambda: _health_is_ok(api), timeout=30)


@pytest.fixture
def throwaway_redis() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A redis-server of our own, to stop in the middle of a test."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    port = _free_port()
    process = subprocess.Popen(
        [server, "--port", str(port), "--save", "", "--appendonly", "no", "--daemonize", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    probe = redis.Redis.from_url(url, socket_connect_timeout=0.2, socket_timeout=0.2)

    def answers() -> bool:
        try:
            return bool(probe.ping())
        except redis.RedisError:
            return False

    try:
        wait_until(answers, timeout=10)
        yield process, url
    finally:
        probe.close()
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=10)


@pytest.fixture
def silent_server() -> Iterator[tuple[str, list[socket.socket]]]:
    """A TCP listener that accepts connections and never answers: a hung dependency."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.05)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept_forever() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)

    thread = threading.Thread(target=accept_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}", held
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        listener.close()


# ------------------------------------------------------------------ all up


def test_health_is_200_ok_with_every_service_connected(api: Api) -> None:
    response = api.get("/health")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True
    data = body["data"]
    assert set(data) == {"status", "timestamp", "version", "services"}
    assert data["status"] == "ok"
    assert data["version"] == __version__
    assert data["services"] == ALL_CONNECTED
    assert datetime.fromisoformat(data["timestamp"]).tzinfo is not None


def test_health_needs_no_authentication(api: Api) -> None:
    response = api.get("/health", headers={"Authorization": "Bearer not-a-token"})
    assert response.status_code == 200, response.text


# ------------------------------------------------------------------ one down


def test_health_is_503_degraded_when_redis_is_stopped(
    api: Api,
    point: Callable[[str, str], None],
    throwaway_redis: tuple[subprocess.Popen[bytes], str],
) -> None:
    process, url = throwaway_redis
    point("redis", url)
    before = api.get("/health")
    assert before.status_code == 200, before.text
    assert before.json()["data"]["services"]["redis"] == "connected"

    process.terminate()
    process.wait(timeout=10)

    after = api.get("/health")
    assert after.status_code == 503, after.text
    assert after.headers["Retry-After"] == "5"  # as every 503 (docs/api.md, the OpenAPI)
    body = after.json()
    assert body["success"] is False
    assert body["data"]["status"] == "degraded"
    assert body["data"]["services"] == {
        "database": "connected",
        "redis": "disconnected",
        "queue": "connected",
    }


@pytest.mark.parametrize("service", SERVICES)
def test_health_is_503_degraded_when_a_service_refuses_connections(
    api: Api, point: Callable[[str, str], None], service: str
) -> None:
    closed = f"127.0.0.1:{_free_port()}"
    urls = {
        "database": f"postgresql+psycopg://maof:maof@{closed}/maof_test",
        "redis": f"redis://{closed}/0",
        "queue": f"http://{closed}",
    }
    point(service, urls[service])
    response = api.get("/health")
    assert response.status_code == 503, response.text
    data = response.json()["data"]
    assert data["status"] == "degraded"
    assert data["services"] == {**ALL_CONNECTED, service: "disconnected"}


def test_health_is_503_degraded_when_the_database_takes_no_writes(
    api: Api, read_only_database: None
) -> None:
    """A failover's read-only node answers every read, and fails every write route: the
    check answered 200 ok through it."""
    response = api.get("/health")
    assert response.status_code == 503, response.text
    data = response.json()["data"]
    assert data["status"] == "degraded"
    assert data["services"] == {**ALL_CONNECTED, "database": "disconnected"}


# ------------------------------------------------------------------ one hung


@pytest.mark.parametrize("service", SERVICES)
def test_health_answers_503_within_2_seconds_when_a_service_hangs(
    api: Api,
    point: Callable[[str, str], None],
    silent_server: tuple[str, list[socket.socket]],
    service: str,
) -> None:
    address, held = silent_server
    urls = {
        "database": f"postgresql+psycopg://maof:maof@{address}/maof_test",
        "redis": f"redis://{address}/0",
        "queue": f"http://{address}",
    }
    point(service, urls[service])

    started = time.monotonic()
    response = api.get("/health")
    elapsed = time.monotonic() - started

    assert held, "the health check never reached the hung server"
    assert elapsed < 2.0, f"health took {elapsed:.2f}s"
    assert response.status_code == 503, response.text
    data = response.json()["data"]
    assert data["status"] == "degraded"
    assert data["services"] == {**ALL_CONNECTED, service: "disconnected"}


def test_health_stays_within_2_seconds_for_many_callers_while_a_service_keeps_hanging(
    api: Api,
    point: Callable[[str, str], None],
    silent_server: tuple[str, list[socket.socket]],
) -> None:
    """Checks stuck on a hung dependency must not starve the checks of other requests."""
    address, _ = silent_server
    point("queue", f"http://{address}")

    def timed_health() -> tuple[float, int, dict[str, str]]:
        started = time.monotonic()
        response = api.get("/health")
        return time.monotonic() - started, response.status_code, response.json()["data"]

    # Rounds of 4 callers: the local server's listen backlog is 5, and a connection beyond it
    # waits a second for a SYN retransmit, which would be timed as part of the answer.
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as callers:
        for _ in range(3):  # later rounds arrive while earlier rounds' checks still hang
            answers = list(callers.map(lambda _: timed_health(), range(4)))
            for elapsed, status, data in answers:
                assert elapsed < 2.0, f"health took {elapsed:.2f}s"
                assert status == 503
                assert data["services"] == {**ALL_CONNECTED, "queue": "disconnected"}
