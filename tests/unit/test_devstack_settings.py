"""The local stack's own settings (read by devstack, not by Settings) as `.env.example`
says every setting is read: empty means unset, and a bad value is one line naming it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from chalicelib.config import get_settings, reset_settings
from devstack import api, dev, stack

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- MAOF_PORT (make dev)


@pytest.mark.parametrize(("environ", "port"), [({}, 3000), ({"MAOF_PORT": ""}, 3000)])
def test_make_dev_listens_on_3000_when_maof_port_is_unset_or_empty(
    environ: dict[str, str], port: int
) -> None:
    assert dev.port_from_environment(environ) == port


def test_make_dev_listens_on_maof_port() -> None:
    assert dev.port_from_environment({"MAOF_PORT": "3411"}) == 3411


@pytest.mark.parametrize("value", ["abc", "3000x", "-1", "0", "70000", "3000.0"])
def test_a_maof_port_that_is_not_a_port_number_is_refused_naming_it(value: str) -> None:
    with pytest.raises(SystemExit, match=f"MAOF_PORT must be a port number .*got '{value}'"):
        dev.port_from_environment({"MAOF_PORT": value})


def test_make_dev_with_a_bad_maof_port_stops_with_one_line_before_starting_anything() -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MAOF_")}
    done = subprocess.run(
        [sys.executable, "-m", "devstack.dev", "--no-demo"],
        cwd=ROOT,
        env={**environ, "MAOF_PORT": "30OO"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "maof: MAOF_PORT must be a port number (1 to 65535), got '30OO'"
    ]


# ---------------------------------------------------------------- MAOF_STATE_DIR


def state_dir_when_started_in(folder: Path, **environ: str) -> str:
    """The stack's state folder as `python -m devstack.stack` started in `folder` sees it
    (it is read once, at import)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MAOF_")}
    done = subprocess.run(
        [sys.executable, "-c", "from devstack.stack import STATE_DIR; print(STATE_DIR.resolve())"],
        cwd=folder,
        env={**base, "PYTHONPATH": str(ROOT), **environ},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


@pytest.mark.parametrize("environ", [{}, {"MAOF_STATE_DIR": ""}])
def test_the_stack_keeps_its_state_in_the_projects_maof_when_unset_or_empty(
    tmp_path: Path, environ: dict[str, str]
) -> None:
    assert state_dir_when_started_in(tmp_path, **environ) == str(ROOT / ".maof")


def test_the_stack_keeps_its_state_in_maof_state_dir(tmp_path: Path) -> None:
    where = tmp_path / "state"
    assert state_dir_when_started_in(tmp_path, MAOF_STATE_DIR=str(where)) == str(where)


# ---------------------------------------------------------------- MAOF_NO_DOCKER


@pytest.fixture
def docker_answers(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A Docker engine installed and answering (`docker info` succeeds)."""
    monkeypatch.setattr(stack.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(stack.subprocess, "run", lambda *a, **k: None)
    monkeypatch.delenv("MAOF_NO_DOCKER", raising=False)
    return monkeypatch


@pytest.mark.parametrize("value", [None, "", "false", "False", "0", "no", "off", "f", "n"])
def test_a_docker_engine_that_answers_is_used_unless_maof_no_docker_is_true(
    docker_answers: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is not None:
        docker_answers.setenv("MAOF_NO_DOCKER", value)
    assert stack.docker_engine_answers() is True


@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes", "on"])
def test_maof_no_docker_true_never_uses_docker(
    docker_answers: pytest.MonkeyPatch, value: str
) -> None:
    docker_answers.setenv("MAOF_NO_DOCKER", value)
    assert stack.docker_engine_answers() is False


def test_a_maof_no_docker_that_is_not_a_boolean_is_refused_naming_it(
    docker_answers: pytest.MonkeyPatch,
) -> None:
    docker_answers.setenv("MAOF_NO_DOCKER", "maybe")
    with pytest.raises(SystemExit, match="MAOF_NO_DOCKER must be true or false, got 'maybe'"):
        stack.docker_engine_answers()


# ---------------------------------------------------------------- the local API server's database


def test_the_local_api_server_has_the_api_functions_database_limits_unless_told() -> None:
    """As deployed (.chalice/config.json's api_handler), a request waits 5 s at most on a
    lock and 15 s on a statement; a value in the environment wins, and empty is unset."""
    limits = {"MAOF_DB_LOCK_TIMEOUT_MS": "5000", "MAOF_DB_STATEMENT_TIMEOUT_MS": "15000"}
    assert api.api_database_limits() == limits
    environ = {"MAOF_DB_LOCK_TIMEOUT_MS": ""}
    api.limit_database_waits(environ)
    assert environ == limits
    environ = {"MAOF_DB_STATEMENT_TIMEOUT_MS": "0"}
    api.limit_database_waits(environ)
    assert environ == {"MAOF_DB_LOCK_TIMEOUT_MS": "5000", "MAOF_DB_STATEMENT_TIMEOUT_MS": "0"}


def test_the_local_api_server_connects_with_those_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m devstack.api` (make dev's API) sets them before its first connection;
    the poller, a process of its own, keeps none."""
    for name in api.API_DATABASE_LIMITS:
        monkeypatch.setenv(name, "")  # unset (and restored after)
    monkeypatch.setattr(sys, "argv", ["devstack.api"])
    monkeypatch.setattr(api, "check_migrated", lambda: None)
    seen: list[tuple[int, int]] = []

    class Server:
        def serve_forever(self) -> None:
            settings = get_settings()
            seen.append((settings.db_lock_timeout_ms, settings.db_statement_timeout_ms))
            raise KeyboardInterrupt

    monkeypatch.setattr(api, "create_server", lambda *args: Server())
    reset_settings()
    try:
        assert api.main() == 0
    finally:
        monkeypatch.undo()
        reset_settings()
    assert seen == [(5000, 15000)]
