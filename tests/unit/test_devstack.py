"""The local stack's own safety: its Postgres asks every connection for the password (the
Unix socket too), its initdb password file is its owner's only, and `make down` stops
only the processes it started, killing one that ignores SIGTERM rather than forgetting it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack import stack


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# pg_hba.conf as `initdb --auth-local=trust --auth-host=scram-sha-256` wrote it (trimmed).
TRUSTING_HBA = """\
# "local" is for Unix domain socket connections only; trust lets anyone in
# TYPE  DATABASE        USER            ADDRESS                 METHOD
local   all             all                                     trust
host    all             all             127.0.0.1/32            scram-sha-256
host    all             all             ::1/128                 scram-sha-256
local   replication     all                                     trust
host    replication     all             127.0.0.1/32            scram-sha-256
"""


@pytest.fixture
def commands(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """start_postgres_server's commands, recorded instead of run (with the pwfile's mode
    as initdb would find it), as a user who is not root, with the usual umask."""
    ran: list[list[str]] = []

    def fake_run(cmd: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        if "--pwfile" in cmd:
            pwfile = Path(cmd[cmd.index("--pwfile") + 1])
            cmd = [*cmd, f"pwfile-mode={mode(pwfile):o}", f"pwfile={pwfile.read_text()!r}"]
        ran.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(stack, "run", fake_run)
    monkeypatch.setattr(stack, "postgres_bin", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(stack, "is_root", lambda: False)
    monkeypatch.setattr(stack, "wait_for", lambda *a, **k: None)
    old = os.umask(0o022)
    yield ran
    os.umask(old)


def test_initdb_asks_local_connections_for_the_password_and_hides_the_socket(
    tmp_path: Path, commands: list[list[str]]
) -> None:
    server = stack.PostgresServer("127.0.0.1", 1, "maof", "pw", tmp_path / "pg")
    stack.start_postgres_server(server)
    initdb, start = commands
    assert "--auth-local=scram-sha-256" in initdb and "--auth-host=scram-sha-256" in initdb
    assert not any("trust" in arg for arg in initdb)
    options = start[start.index("-o") + 1]
    assert "-c unix_socket_permissions=0700" in options
    assert mode(server.run_dir) == 0o700 and mode(server.folder) == 0o700


def test_the_initdb_password_file_is_its_owners_only_and_removed(
    tmp_path: Path, commands: list[list[str]]
) -> None:
    folder = tmp_path / "pg"
    folder.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("untouched")
    (folder / "pwfile").symlink_to(elsewhere)  # left behind, or planted: never written through
    stack.start_postgres_server(stack.PostgresServer("127.0.0.1", 1, "maof", "s3cret", folder))
    initdb = commands[0]
    assert "pwfile-mode=600" in initdb and "pwfile='s3cret\\n'" in initdb
    assert not (folder / "pwfile").exists() and not (folder / "pwfile").is_symlink()
    assert elsewhere.read_text() == "untouched"


def test_an_existing_data_folder_that_trusted_local_connections_is_tightened(
    tmp_path: Path, commands: list[list[str]]
) -> None:
    """A .maof/postgres an older devstack made: its local lines trusted every OS user,
    and its socket folder was 0755. Both are tightened before it starts again."""
    server = stack.PostgresServer("127.0.0.1", 1, "maof", "pw", tmp_path / "pg")
    server.data.mkdir(parents=True)
    (server.data / "PG_VERSION").write_text("15\n")
    hba = server.data / "pg_hba.conf"
    hba.write_text(TRUSTING_HBA)
    hba.chmod(0o600)
    server.run_dir.mkdir(mode=0o755)
    server.run_dir.chmod(0o755)
    stack.start_postgres_server(server)
    assert [cmd[0] for cmd in commands] == ["/usr/bin/pg_ctl"]  # no initdb: it exists
    lines = hba.read_text().splitlines()
    assert lines[0] == TRUSTING_HBA.splitlines()[0]  # comments as they were
    rules = [line.split() for line in lines if line and not line.startswith("#")]
    assert [rule[-1] for rule in rules] == ["scram-sha-256"] * 5
    assert [rule[0] for rule in rules] == ["local", "host", "host", "local", "host"]
    assert mode(hba) == 0o600
    assert mode(server.run_dir) == 0o700
    assert stack.require_local_passwords(hba) is False  # nothing left to change


def test_create_database_gives_psql_and_createdb_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    environments: list[dict[str, str]] = []

    def fake(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        environments.append(kwargs.get("env") or {})
        return subprocess.CompletedProcess(cmd, 0, stdout="")

    monkeypatch.setattr(stack, "postgres_bin", lambda name: name)
    monkeypatch.setattr(stack.subprocess, "run", fake)
    server = stack.PostgresServer("127.0.0.1", 1, "maof", "s3cret", tmp_path)
    stack.create_database(server, "maof")
    assert [env.get("PGPASSWORD") for env in environments] == ["s3cret", "s3cret"]


# ------------------------------------------------------------------ a real dev Postgres


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _psql(server: stack.PostgresServer, *, user: str | None = None, password: str | None = None):
    env = {"PATH": os.environ["PATH"], "PGPASSFILE": "/nonexistent", "PGCONNECT_TIMEOUT": "10"}
    if password is not None:
        env["PGPASSWORD"] = password
    command = [stack.postgres_bin("psql"), *server.client_args, "-d", "postgres", "-w", "-tAc"]
    command.append("SELECT current_user")
    if user is not None:
        command = ["runuser", "-u", user, "--", *command]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd="/", timeout=30)


@pytest.fixture
def dev_postgres(tmp_path: Path) -> Iterator[stack.PostgresServer]:
    """A Postgres of its own, started as `make stack` starts one, on a free port."""
    password = f"pw-{uuid.uuid4().hex}"
    server = stack.PostgresServer(
        "127.0.0.1", _free_port(), "maof", password, stack.postgres_dir(tmp_path / "pg")
    )
    try:
        stack.start_postgres_server(server)
        yield server
    finally:
        if (server.data / "postmaster.pid").exists():
            stack.pg_ctl(server.data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(server.folder, ignore_errors=True)  # /var/tmp/… when root


@pytest.mark.skipif(
    not (stack.is_root() and shutil.which("runuser") and shutil.which("psql")),
    reason="needs root (to run initdb as postgres and psql as another user), runuser and psql",
)
def test_no_local_account_reaches_the_dev_postgres_without_its_password(
    dev_postgres: stack.PostgresServer,
) -> None:
    server = dev_postgres
    stack.create_database(server, "devstack_check")  # what make stack does, over the socket
    socket_file = server.run_dir / f".s.PGSQL.{server.port}"
    assert mode(server.run_dir) == 0o700 and mode(socket_file) == 0o700
    with_password = _psql(server, password=server.password)
    assert with_password.stdout.strip() == "maof", with_password.stderr
    without = _psql(server)  # root, with no password: trust would let it in
    assert without.returncode != 0 and "no password supplied" in without.stderr
    other = _psql(server, user="nobody")  # another account, knowing nothing
    assert other.returncode != 0 and other.stdout == "", other.stdout
    # A data folder an older devstack made trusts local connections: started again, it no
    # longer does.
    stack.pg_ctl(server.data, "-m", "fast", "-w", "stop", check=True)
    hba = server.data / "pg_hba.conf"
    hba.write_text(
        "\n".join(
            line.replace("scram-sha-256", "trust") if line.startswith("local") else line
            for line in hba.read_text().splitlines()
        )
    )
    server.run_dir.chmod(0o755)
    stack.start_postgres_server(server)
    assert "trust" not in "".join(
        line for line in hba.read_text().splitlines() if not line.startswith("#")
    )
    assert mode(server.run_dir) == 0o700
    again = _psql(server)
    assert again.returncode != 0 and "no password supplied" in again.stderr
    assert _psql(server, password=server.password).stdout.strip() == "maof"


# ------------------------------------------------------------------ stopping by pid file

# Stands in for a server: says it is up, optionally ignores SIGTERM, answers each line on
# stdin with "pong" (so a test can tell it is still there without waiting on a clock).
SERVER = """
import signal, sys
if sys.argv[1] == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("up", flush=True)
for line in sys.stdin:
    print("pong", flush=True)
"""


@pytest.fixture
def started() -> Iterator[Any]:
    children: list[subprocess.Popen[str]] = []

    def start(behaviour: str, marker: str) -> subprocess.Popen[str]:
        child = subprocess.Popen(
            [sys.executable, "-c", SERVER, behaviour, marker],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        children.append(child)
        assert child.stdout is not None and child.stdout.readline().strip() == "up"
        return child

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait(10)


def alive(child: subprocess.Popen[str]) -> bool:
    assert child.stdin is not None and child.stdout is not None
    try:
        child.stdin.write("ping\n")
        child.stdin.flush()
    except BrokenPipeError:
        return False
    return child.stdout.readline().strip() == "pong"


def test_a_process_that_ignores_sigterm_is_killed_before_its_pid_file_goes(
    tmp_path: Path,
    started: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name = f"server-{uuid.uuid4().hex[:8]}"  # named on its command line, as redis-server is
    child = started("ignore-term", name)
    pidfile = tmp_path / "server.pid"
    pidfile.write_text(f"{child.pid}\n")
    monkeypatch.setattr(stack, "STOP_TIMEOUT_SECONDS", 0.5, raising=False)
    stack.stop_pidfile(pidfile, name)
    assert child.wait(10) == -signal.SIGKILL
    assert not pidfile.exists()
    out = capsys.readouterr().out
    assert "after SIGTERM: SIGKILL" in out and f"{name}: stopped" in out


def test_a_process_that_outlives_sigkill_keeps_its_pid_file_and_is_reported(
    tmp_path: Path,
    started: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name = f"server-{uuid.uuid4().hex[:8]}"
    child = started("ignore-term", name)
    pidfile = tmp_path / "server.pid"
    pidfile.write_text(str(child.pid))
    sent: list[int] = []
    real_kill = os.kill

    def kill(pid: int, signum: int) -> None:  # signals are noted, never delivered (D state)
        if signum == 0:
            real_kill(pid, 0)
        else:
            sent.append(signum)

    monkeypatch.setattr(stack.os, "kill", kill)
    monkeypatch.setattr(stack, "STOP_TIMEOUT_SECONDS", 0.3, raising=False)
    with pytest.raises(SystemExit, match=rf"{name} \(pid {child.pid}\) is still running"):
        stack.stop_pidfile(pidfile, name)
    monkeypatch.undo()
    assert sent == [signal.SIGTERM, signal.SIGKILL]
    assert pidfile.read_text() == str(child.pid)
    assert alive(child)
    assert "stopped" not in capsys.readouterr().out


def test_a_stale_pid_file_is_removed_without_signalling_whoever_has_that_pid_now(
    tmp_path: Path, started: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    someone_else = started("default", "not-the-server")  # now holds the pid the file names
    pidfile = tmp_path / "redis.pid"
    pidfile.write_text(str(someone_else.pid))
    stack.stop_pidfile(pidfile, "redis")  # expects redis-server
    assert alive(someone_else)
    assert not pidfile.exists()
    assert "redis: not running" in capsys.readouterr().out


def test_a_server_that_stops_on_sigterm_is_stopped(
    tmp_path: Path, started: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"server-{uuid.uuid4().hex[:8]}"
    child = started("default", name)
    pidfile = tmp_path / "server.pid"
    pidfile.write_text(str(child.pid))
    stack.stop_pidfile(pidfile, name)
    assert child.wait(10) == -signal.SIGTERM
    assert not pidfile.exists()
    assert f"{name}: stopped" in capsys.readouterr().out
