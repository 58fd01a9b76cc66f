"""Start, check and stop the local stack: Postgres, Redis and LocalStack (SQS, S3).

A service that already answers at its configured URL is reused. Otherwise, when a
Docker engine answers, `docker compose up` starts them; without one, each is
started from installed binaries (installing Debian packages or a LocalStack
virtualenv when missing) under `.maof/`, and `down` stops only what we started.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import TypeAdapter, ValidationError

from chalicelib.config import ConfigError, Settings, get_settings
from chalicelib.engine.queue import MAX_RECEIVES

PROJECT_DIR = Path(__file__).resolve().parents[1]
# Empty is unset, as everywhere in the settings (Path("") would be the current directory).
STATE_DIR = Path(os.environ.get("MAOF_STATE_DIR") or PROJECT_DIR / ".maof")
LOCALSTACK_VERSION = "2026.3.0"
# What a received stage message stays hidden for: longer than run_stage may run (its failed
# records come back in seconds all the same: the handler shortens their visibility).
VISIBILITY_TIMEOUT_SECONDS = 960
LOCALSTACK_PINS = ["cbor2<6", "pyopenssl==24.3.0", "service-identity"]
LOCALSTACK_SERVICES = "sqs,s3,ssm,cloudformation,cloudwatch,sns"


def say(message: str) -> None:
    print(f"stack: {message}", flush=True)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for(check: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    raise SystemExit(f"stack: {what} did not become ready within {timeout:.0f}s")


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, **kwargs)  # type: ignore[call-overload,no-any-return]


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


_apt_updated = False


def apt_install(*packages: str) -> None:
    global _apt_updated
    if not (is_root() and shutil.which("apt-get")):
        raise SystemExit(
            f"stack: {' '.join(packages)} not installed and cannot be installed here "
            "(needs root and apt-get); install it or point the MAOF_* URL at a running one"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if not _apt_updated:
        say("apt-get update")
        run(["apt-get", "update", "-qq"], env=env, stdout=subprocess.DEVNULL)
        _apt_updated = True
    say(f"installing {' '.join(packages)} from Debian packages")
    run(["apt-get", "install", "-y", "-qq", *packages], env=env, stdout=subprocess.DEVNULL)


def docker_turned_off() -> bool:
    """MAOF_NO_DOCKER read as Settings reads a boolean (true/false, 1/0, yes/no, on/off;
    empty is unset: false); SystemExit with one line naming it when it is none of these."""
    value = os.environ.get("MAOF_NO_DOCKER", "")
    if not value:
        return False
    try:
        return TypeAdapter(bool).validate_python(value)
    except ValidationError:
        raise SystemExit(f"stack: MAOF_NO_DOCKER must be true or false, got {value!r}") from None


def docker_engine_answers() -> bool:
    if docker_turned_off() or not shutil.which("docker"):
        return False
    try:
        subprocess.run(["docker", "info"], capture_output=True, timeout=5, check=True)
        return True
    except (subprocess.SubprocessError, OSError):
        return False


# ---------------------------------------------------------------- Postgres


def postgres_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)
    if candidates:
        return str(candidates[0])
    apt_install("postgresql")
    return postgres_bin(name)


def as_postgres_user(cmd: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root; Debian's package makes a `postgres` user.
    if is_root():
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


def _postgres_user_exists() -> bool:
    try:
        pwd.getpwnam("postgres")
        return True
    except KeyError:
        return False


def postgres_dir(base: Path | None = None) -> Path:
    """Where a Postgres of ours keeps its files: `base` (default `.maof/postgres`), unless we
    are root and the `postgres` user (initdb refuses root) cannot reach it (a private home
    folder, say); then a folder in /var/tmp named after it."""
    preferred = base or STATE_DIR / "postgres"
    if not is_root():
        return preferred
    if not _postgres_user_exists():
        run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "postgres"])
    preferred.parent.mkdir(parents=True, exist_ok=True)
    if _traversable_by_others(preferred.parent):
        return preferred
    named = PROJECT_DIR if base is None else preferred
    digest = hashlib.sha256(str(named).encode()).hexdigest()[:12]
    return Path("/var/tmp") / f"maof-postgres-{digest}"  # noqa: S108 (owned by postgres, 0700)


def _traversable_by_others(path: Path) -> bool:
    """Every folder from / down to `path` lets other users through."""
    for folder in [path, *path.parents]:
        if not folder.stat().st_mode & stat.S_IXOTH:
            return False
    return True


@dataclass(frozen=True)
class PostgresServer:
    """One Postgres server we run from binaries: where it listens and keeps its files."""

    host: str
    port: int
    user: str
    password: str
    folder: Path

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def client_args(self) -> list[str]:
        """How psql and createdb reach it: its socket folder, port and superuser."""
        return ["-h", str(self.run_dir), "-p", str(self.port), "-U", self.user]

    @property
    def run_dir(self) -> Path:
        return self.folder / "run"

    @property
    def log(self) -> Path:
        return self.folder / "postgres.log"


def start_postgres(settings: Settings) -> None:
    """Our Postgres, its superuser the owner role of MAOF_MIGRATION_DATABASE_URL (the
    application's role is made by the migrations: chalicelib/db/roles.py)."""
    url = urlparse(settings.migration_database_url.replace("+psycopg", ""))
    host, port = url.hostname or "127.0.0.1", url.port or 5432
    user, password = url.username or "maof", url.password or "maof"
    database = (url.path or "/maof").lstrip("/")
    if port_open(host, port):
        say(f"postgres: reusing the server at {host}:{port}")
        return
    server = PostgresServer(host, port, user, password, postgres_dir())
    start_postgres_server(server)
    create_database(server, database)


def start_postgres_server(server: PostgresServer) -> None:
    """initdb (first time only) and start `server`; returns once it accepts connections.

    Every connection needs the superuser's password, over the Unix socket too (never
    `trust`: through it any local account would be the superuser), and the socket folder
    is its owner's only. A data folder an older version made with `trust` is tightened."""
    folder, data, run_dir, log = server.folder, server.data, server.run_dir, server.log
    initdb, pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
    for private in (folder, run_dir):
        private.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(private, 0o700)  # mkdir's mode is cut by the umask, and not applied if it exists
    fresh = not (data / "PG_VERSION").exists()
    if fresh:
        data.mkdir(parents=True, exist_ok=True)
        pwfile = folder / "pwfile"
        pwfile.unlink(missing_ok=True)  # left by an initdb that was interrupted
        descriptor = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "w") as handle:
                handle.write(server.password + "\n")
            if is_root():
                shutil.chown(folder, "postgres")
                for path in (data, run_dir, pwfile):
                    shutil.chown(path, "postgres")
            say(f"postgres: initdb in {data}")
            run(
                as_postgres_user(
                    [
                        initdb,
                        "-D",
                        str(data),
                        "-U",
                        server.user,
                        "--pwfile",
                        str(pwfile),
                        "--auth-local=scram-sha-256",
                        "--auth-host=scram-sha-256",
                        "-E",
                        "UTF8",
                    ]
                ),
                stdout=subprocess.DEVNULL,
            )
        finally:
            pwfile.unlink(missing_ok=True)
    else:
        require_local_passwords(data / "pg_hba.conf")
    if is_root():
        log.touch()
        shutil.chown(log, "postgres")
    options = (
        f"-p {server.port} -k {run_dir} -c unix_socket_permissions=0700 "
        f"-c listen_addresses={server.host} -c fsync=off -c max_connections=200"
    )
    say(f"postgres: starting on {server.host}:{server.port}")
    run(
        as_postgres_user([pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "start"]),
        stdout=subprocess.DEVNULL,
    )
    wait_for(lambda: port_open(server.host, server.port), "postgres", 30)


# A `local` line of pg_hba.conf whose method is trust: initdb --auth-local=trust wrote them.
_TRUSTED_LOCAL_LINE = re.compile(r"^(\s*local\s+\S+\s+\S+\s+)trust\b", re.MULTILINE)


def require_local_passwords(hba: Path) -> bool:
    """Make the `local` lines of `hba` (a pg_hba.conf) that trust every local account ask
    for the password instead (scram-sha-256, as the TCP ones); True if it changed any.
    It applies when the server (re)starts or reloads its configuration."""
    text = hba.read_text()
    tightened, changed = _TRUSTED_LOCAL_LINE.subn(r"\1scram-sha-256", text)
    if changed:
        hba.write_text(tightened)  # in place: its owner and mode stay
        say(f"postgres: {hba}: local connections now need the password (were trusted)")
    return changed > 0


def create_database(server: PostgresServer, database: str) -> None:
    """Create `database` on `server` unless it exists."""
    password = {**os.environ, "PGPASSWORD": server.password}  # the socket asks for it too
    exists = subprocess.run(
        [
            postgres_bin("psql"),
            *server.client_args,
            "-d",
            "postgres",
            "-tAc",
            f"SELECT 1 FROM pg_database WHERE datname = '{database}'",
        ],
        capture_output=True,
        text=True,
        check=True,
        env=password,
    ).stdout.strip()
    if exists != "1":
        run([postgres_bin("createdb"), *server.client_args, database], env=password)
        say(f"postgres: created database {database}")


def pg_ctl(data: Path, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    """`pg_ctl -D data …` as the postgres user (e.g. `stop -m fast`, `restart -m immediate`)."""
    return subprocess.run(
        as_postgres_user([postgres_bin("pg_ctl"), "-D", str(data), *args]),
        stdout=subprocess.DEVNULL,
        text=True,
        check=check,
    )


def stop_postgres(folder: Path | None = None) -> None:
    data = (folder or postgres_dir()) / "data"
    if (data / "postmaster.pid").exists():
        pg_ctl(data, "-m", "fast", "stop")
        say("postgres: stopped")


# ---------------------------------------------------------------- Redis


def start_redis(settings: Settings) -> None:
    url = urlparse(settings.redis_url)
    host, port = url.hostname or "127.0.0.1", url.port or 6379
    if port_open(host, port):
        say(f"redis: reusing the server at {host}:{port}")
        return
    start_redis_server(host, port, STATE_DIR / "redis")


def start_redis_server(host: str, port: int, folder: Path) -> None:
    """Start a Redis without persistence (a cache: it comes back empty) on host:port."""
    if not shutil.which("redis-server"):
        apt_install("redis-server")
    folder.mkdir(parents=True, exist_ok=True)
    say(f"redis: starting on {host}:{port}")
    run(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            host,
            "--dir",
            str(folder),
            "--daemonize",
            "yes",
            "--pidfile",
            str(folder / "redis.pid"),
            "--logfile",
            str(folder / "redis.log"),
            "--save",
            "",
            "--appendonly",
            "no",
        ]
    )
    # Redis listens before it writes its pidfile (created, then written): stop_pidfile
    # needs the pid in it.
    wait_for(lambda: port_open(host, port) and _holds_pid(folder / "redis.pid"), "redis", 15)


def _holds_pid(path: Path) -> bool:
    try:
        return path.read_text().strip().isdigit()
    except FileNotFoundError:
        return False


# What the command line of each server we start names (Redis rewrites its own to
# `redis-server host:port`): a pid file's number is only signalled if it still names it.
PROGRAMS = {"redis": "redis-server", "localstack": "localstack.runtime.main"}
STOP_TIMEOUT_SECONDS = 15.0


def stop_pidfile(
    path: Path, name: str, program: str | None = None, timeout: float | None = None
) -> None:
    """Stop the process `path` holds the pid of, if its command line still names `program`
    (default: PROGRAMS[name], else `name`; a stale pid may be another process's by now):
    SIGTERM, then after `timeout` s (STOP_TIMEOUT_SECONDS) SIGKILL. The pid file goes once
    the process has; if it outlives SIGKILL too, SystemExit, and the pid file is kept."""
    if not path.exists():
        return
    expected = program or PROGRAMS.get(name, name)
    timeout = STOP_TIMEOUT_SECONDS if timeout is None else timeout
    try:
        pid = int(path.read_text().strip())
    except ValueError:
        pid = None
    if pid is None or pid <= 0 or not _runs(pid, expected):  # never kill(-1) or kill(0)
        path.unlink(missing_ok=True)
        say(f"{name}: not running (removed its stale pid file {path})")
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not _exited(pid, timeout):
        say(f"{name}: pid {pid} still running {timeout:g} s after SIGTERM: SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not _exited(pid, timeout):
            raise SystemExit(
                f"stack: {name} (pid {pid}) is still running after SIGKILL; "
                f"its pid file {path} is kept"
            )
    path.unlink(missing_ok=True)
    say(f"{name}: stopped")


def command_line(pid: int) -> str | None:
    """The command line of process `pid`, its arguments joined by spaces; None when there is
    no such process, or it has exited (a zombie has none)."""
    proc = Path("/proc")
    if proc.joinpath("self").exists():
        try:
            raw = (proc / str(pid) / "cmdline").read_bytes()
        except OSError:
            return None
        return raw.replace(b"\0", b" ").decode(errors="replace").strip() or None
    answer = subprocess.run(  # no /proc (macOS): ps says the same
        ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True
    )
    return answer.stdout.strip() or None


def _runs(pid: int, program: str) -> bool:
    found = command_line(pid)
    return found is not None and program in found


def _exited(pid: int, timeout: float) -> bool:
    """Whether process `pid` is gone (or a zombie) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if command_line(pid) is None:
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


# ---------------------------------------------------------------- LocalStack


def localstack_python() -> str:
    """An interpreter for LocalStack's own virtualenv: Python 3.13 (localstack-core
    2026.3.0 needs it; the last release for older Pythons uses 3.12 syntax in its SQS),
    from pyenv even when pyenv is not on PATH, else python3.13 on PATH."""
    candidates: list[str] = []
    if shutil.which("pyenv"):
        prefix = subprocess.run(["pyenv", "prefix", "3.13.0"], capture_output=True, text=True)
        if prefix.returncode == 0:
            candidates.append(str(Path(prefix.stdout.strip()) / "bin" / "python3"))
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates += [str(path) for path in sorted(pyenv_root.glob("versions/3.13*/bin/python3"))]
    candidates += [path for path in [shutil.which("python3.13")] if path]
    for python in candidates:
        if subprocess.run([python, "-c", "import venv"], capture_output=True).returncode == 0:
            return python
    raise SystemExit(
        "stack: LocalStack needs Python 3.13 (`pyenv install 3.13.0`, or python3.13 on PATH); "
        "or start LocalStack yourself (docker compose up -d localstack) and set "
        "MAOF_AWS_ENDPOINT_URL to it"
    )


def localstack_venv() -> Path:
    venv = STATE_DIR / "localstack-venv"
    python, version = localstack_python(), LOCALSTACK_VERSION
    marker = venv / f".installed-{version}"
    if marker.exists():
        return venv
    say(f"localstack: installing localstack-core {version} in {venv} (first run only)")
    shutil.rmtree(venv, ignore_errors=True)
    run([python, "-m", "venv", str(venv)])
    run(
        [
            str(venv / "bin" / "pip"),
            "install",
            "-q",
            "--disable-pip-version-check",
            f"localstack-core[runtime]=={version}",
            *LOCALSTACK_PINS,
        ],
        stderr=subprocess.DEVNULL,
    )
    marker.touch()
    return venv


def localstack_ready(endpoint: str) -> bool:
    try:
        health = f"{endpoint}/_localstack/health"
        with urllib.request.urlopen(health, timeout=1) as response:  # noqa: S310 (our own URL)
            services = json.load(response).get("services", {})
        return all(services.get(name) in ("available", "running") for name in ("sqs", "s3"))
    except (OSError, ValueError):
        return False


def start_localstack(settings: Settings) -> None:
    endpoint = settings.aws_endpoint_url or "http://127.0.0.1:4566"
    url = urlparse(endpoint)
    host, port = url.hostname or "127.0.0.1", url.port or 4566
    if port_open(host, port):
        say(f"localstack: reusing the server at {endpoint}")
        wait_for(lambda: localstack_ready(endpoint), "localstack", 60)
        return
    start_localstack_server(endpoint, STATE_DIR / "localstack")


def start_localstack_server(
    endpoint: str,
    folder: Path,
    services: str = LOCALSTACK_SERVICES,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.Popen[bytes]:
    """Start LocalStack from its virtualenv, listening at `endpoint`, its log and pid file in
    `folder` (its own process group); returns once SQS and S3 answer. `env` adds to the
    environment it runs with."""
    url = urlparse(endpoint)
    host, port = url.hostname or "127.0.0.1", url.port or 4566
    venv = localstack_venv()
    folder.mkdir(parents=True, exist_ok=True)
    # LocalStack empties its temp folder when it starts and stops: never a shared one
    # (/tmp/localstack), or a second LocalStack on this machine would wipe the first's.
    (folder / "tmp").mkdir(exist_ok=True)
    environment = {
        **os.environ,
        "TMPDIR": str(folder / "tmp"),
        "GATEWAY_LISTEN": f"{host}:{port}",
        "SERVICES": services,
        "LOCALSTACK_VOLUME_DIR": str(folder / "volume"),
        "DNS_ADDRESS": "0",
        "SKIP_SSL_CERT_DOWNLOAD": "1",
        "DISABLE_EVENTS": "1",
        "SQS_ENDPOINT_STRATEGY": "path",
        # Else every SQS request also publishes CloudWatch metrics, through LocalStack's own
        # gateway: about 60% of its CPU a stage, for figures nothing here reads.
        "SQS_DISABLE_CLOUDWATCH_METRICS": "1",
        **(env or {}),
    }
    say(f"localstack: starting on {endpoint}")
    with open(folder / "localstack.log", "ab") as log:
        process = subprocess.Popen(
            [str(venv / "bin" / "python"), "-m", "localstack.runtime.main"],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=folder,
        )
    (folder / "localstack.pid").write_text(str(process.pid))
    wait_for(lambda: localstack_ready(endpoint), "localstack", timeout)
    return process


# ---------------------------------------------------------------- AWS resources


def ensure_audit_bucket(s3: object, bucket: str) -> None:
    """The checkpoints' bucket, with Object Lock (compliance mode, a day locally; years in
    AWS: infra/template.json), so a checkpoint once written cannot be changed."""
    client: Any = s3
    try:
        client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    except client.exceptions.BucketAlreadyOwnedByYou:
        return
    client.put_object_lock_configuration(
        Bucket=bucket,
        ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": "COMPLIANCE", "Days": 1}},
        },
    )


def ensure_resources(settings: Settings) -> None:
    """Create the stage queue, its dead-letter queue, the dashboard bucket and the audit
    checkpoints' bucket (idempotent)."""
    from chalicelib.aws import aws_client

    sqs = aws_client("sqs")
    dlq_url = sqs.create_queue(QueueName=f"{settings.stage_queue_name}-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(MAX_RECEIVES)})
    attributes = {"VisibilityTimeout": str(VISIBILITY_TIMEOUT_SECONDS), "RedrivePolicy": redrive}
    queue_url = sqs.create_queue(QueueName=settings.stage_queue_name)["QueueUrl"]
    sqs.set_queue_attributes(QueueUrl=queue_url, Attributes=attributes)
    s3 = aws_client("s3")
    bucket = settings.dashboard_bucket
    try:
        s3.create_bucket(Bucket=bucket)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    s3.put_bucket_website(
        Bucket=bucket,
        WebsiteConfiguration={
            "IndexDocument": {"Suffix": "index.html"},
            "ErrorDocument": {"Key": "index.html"},
        },
    )
    ensure_audit_bucket(s3, settings.audit_bucket)
    say(
        f"resources: queue {settings.stage_queue_name} (+dlq), bucket {bucket}, "
        f"audit bucket {settings.audit_bucket}"
    )


# ---------------------------------------------------------------- commands


def up(settings: Settings) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    endpoint = urlparse(settings.aws_endpoint_url or "http://127.0.0.1:4566")
    everything_up = all(
        [
            port_open(*_host_port(settings.migration_database_url.replace("+psycopg", ""), 5432)),
            port_open(*_host_port(settings.redis_url, 6379)),
            port_open(endpoint.hostname or "127.0.0.1", endpoint.port or 4566),
        ]
    )
    if not everything_up and docker_engine_answers():
        say("a Docker engine answers: docker compose up -d --wait")
        run(["docker", "compose", "up", "-d", "--wait"], cwd=PROJECT_DIR)
        (STATE_DIR / "compose").touch()
    start_postgres(settings)
    start_redis(settings)
    start_localstack(settings)
    ensure_resources(settings)


def down() -> None:
    if (STATE_DIR / "compose").exists():
        subprocess.run(["docker", "compose", "down"], cwd=PROJECT_DIR, check=False)
        (STATE_DIR / "compose").unlink()
    stop_pidfile(STATE_DIR / "localstack" / "localstack.pid", "localstack")
    stop_pidfile(STATE_DIR / "redis" / "redis.pid", "redis")
    stop_postgres()


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    parsed = urlparse(url)
    return parsed.hostname or "127.0.0.1", parsed.port or default_port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.stack")
    parser.add_argument("command", choices=["up", "down", "resources"])
    args = parser.parse_args(argv)
    try:
        settings = get_settings()
    except ConfigError as exc:
        print(f"maof: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "up":
        up(settings)
    elif args.command == "resources":
        ensure_resources(settings)
    else:
        down()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
