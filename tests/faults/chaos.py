"""The outage harness: an isolated local stack, a drain of 100+ runs, a fault in its middle.

The stack is MAOF's own, started by the functions of `devstack.stack` but on ports
and data folders of its own (`.maof/chaos/session-<pid>/`): a second Postgres, Redis and
LocalStack (its own TMPDIR too), so restarting them disturbs no other test or engineer. On
it, MAOF's API (`devstack.api`) and poller (`devstack.poller`, as `make dev`
runs it) are subprocesses with the default engine settings: every MAOF_* variable of the
calling environment is dropped, only the URLs of this stack and a mock agent delay are set.

Each fault: a new user and a `mock://` agent; 100 three-stage runs submitted at once; once
the drain is under way, the fault is injected while more runs are submitted through it:

  baseline    nothing (what the figures are without a fault)
  postgres    `pg_ctl restart -m immediate` (a crash and recovery of the database)
  redis       Redis stopped, five seconds without it, started again (empty)
  localstack  LocalStack killed and started again: it comes back with no queue or bucket
  worker      the poller SIGKILLed and a new one started (a Lambda that died mid-batch)
  worker-freeze  the poller SIGSTOPped, a new one started, the old one SIGCONTed
              FREEZE_SECONDS later to run on beside it, holding claims taken over meanwhile
  *-freeze    Postgres, Redis or LocalStack SIGSTOPped for FREEZE_SECONDS, then SIGCONT:
              a dependency that hangs (a partition, a stalled host) rather than refusing,
              for longer than a stage's lease

then it waits for every stored run of that user to end and measures: runs accepted (answered
202), completed, failed, stuck (not ended STUCK_AFTER_SECONDS after the dependency answered
again) and recovery seconds (from the dependency answering again until the last accepted run
ended; the drain left at the fault is part of it: the baseline row shows how much). And it
checks that a submission answered 202 or 503 only (a 500 leaves the client unable to know
whether the run was stored), that 503s stored nothing and 202s stored their run, that no
stage has two `execute` entries nor two StagesFinished metric lines (a worker that lost its
claim counts nothing), that nothing happened to a run after it ended (no stage
started, no audit entry other than `skip`), that every audit chain verifies, and, after
LocalStack's restart, that the dashboard is back in its bucket.

`python -m tests.faults.chaos` (`make chaos`) runs every fault and prints the table;
tests/faults/test_outages.py runs the same and asserts on it. Per-run records land in
test-artifacts/chaos/<fault>.json, the stack's logs in test-artifacts/chaos/logs/.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis
import requests

from devstack import stack as local_stack
from devstack.stack import PROJECT_DIR, STATE_DIR, PostgresServer

CHAOS_DIR = STATE_DIR / "chaos"
ARTIFACTS = PROJECT_DIR / "test-artifacts" / "chaos"
HOST = "127.0.0.1"
TERMINAL = ("completed", "failed", "cancelled")
SESSION_MARKER = "MAOF_CHAOS_SESSION"

# The target is 30 s; the assertion allows 15 s more because this machine (two
# cores, shared with other engineers' test sessions) stretches every timing by up to half.
RECOVERY_TARGET_SECONDS = 30.0
RECOVERY_LIMIT_SECONDS = 45.0
# A run still open this long after its dependency answered again is stuck.
STUCK_AFTER_SECONDS = 60.0
RUNS_BEFORE_FAULT = 100
# The fault is injected once this share of the burst's stages completed (mid-drain).
FAULT_AT_PROGRESS = 0.2
# Mock agents take this long per stage: 300 stages over the poller's 40 concurrent records
# make a drain of a few seconds. Shorter than the engine's pool idle ping (1 s), so a busy
# worker reuses its database connections as a busy Lambda does, and a restart breaks them.
MOCK_AGENT_DELAY_MS = 300
# The chaos user's agent takes fewer calls at once than the poller runs records, so stages
# wait for its slots and are handed them throughout: every fault also meets the
# backpressure paths (parking, hand-offs, slot leases, the sweeper waking waiting stages).
AGENT_SLOTS = 12
REDIS_OUTAGE_SECONDS = 5.0
# A frozen dependency hangs this long: past a stage's lease (15 s), so leases lapse while
# their workers wait, and past the timeouts of Redis calls (0.5 s) and of the API's SQS
# sends (about 2 s); the engine's SQS calls (read timeout 25 s) wait it out.
FREEZE_SECONDS = 20.0
# While the dependency is away (and a second after), a run is submitted every this often.
SUBMIT_EVERY_SECONDS = 0.25
SUBMIT_TIMEOUT_SECONDS = 30.0
CAPABILITIES = ("extract", "translate", "summarize")

# Without Redis work goes on: at least this share of the runs open when it went away must
# end before it is back (a stopped Redis is away about seven seconds, a frozen one twenty:
# about half a drain, and two). Before Redis calls failed fast while it hung, a third of
# them ended in the freeze. Likewise while a worker is frozen: another takes its work
# over, though only once the frozen one's stage and slot leases lapse (15 s into the 20):
# 27 to 62 of 100 in the runs seen here.
WORK_GOES_ON = {"redis": 0.1, "redis-freeze": 0.5, "worker-freeze": 0.1}

RESULTS: list[FaultResult] = []  # every fault run in this process, for the table


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for(check: Callable[[], Any], what: str, timeout: float, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout:.0f}s")
        time.sleep(interval)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _started_by_session(pid: int, session: Path) -> bool:
    """Whether process `pid` is one this harness started for `session` (its environment
    carries the session marker, or it runs in the session's folder): a pid file never
    makes us signal a process that merely reused the number."""
    proc = Path("/proc") / str(pid)
    try:
        if f"{SESSION_MARKER}={session}".encode() in (proc / "environ").read_bytes():
            return True
        return Path(os.readlink(proc / "cwd")).is_relative_to(session)
    except OSError:
        return False


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- the isolated stack


@dataclass
class ChaosStack:
    """Postgres, Redis, LocalStack, MAOF's API and poller, all of this session only."""

    folder: Path
    pg_port: int
    redis_port: int
    localstack_port: int
    api_port: int
    postgres: PostgresServer | None = None
    localstack: subprocess.Popen[bytes] | None = None
    api: subprocess.Popen[bytes] | None = None
    poller: subprocess.Popen[bytes] | None = None
    # Pollers replaced while frozen and then thawed: they run on beside the new one.
    stale_pollers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    stopped: bool = False

    @classmethod
    def create(cls) -> ChaosStack:
        clean_stale_sessions()
        folder = CHAOS_DIR / f"session-{os.getpid()}"
        if folder.exists():
            teardown_session(folder)
        (folder / "logs").mkdir(parents=True)
        (folder / "owner.pid").write_text(str(os.getpid()))
        ports = set()
        while len(ports) < 4:
            ports.add(free_port())
        pg, rd, ls, api = sorted(ports)
        return cls(folder, pg, rd, ls, api)

    # ---- addresses

    @property
    def database_url(self) -> str:
        return f"postgresql+psycopg://maof:maof@{HOST}:{self.pg_port}/maof"

    @property
    def conninfo(self) -> str:
        return f"postgresql://maof:maof@{HOST}:{self.pg_port}/maof"

    @property
    def redis_url(self) -> str:
        return f"redis://{HOST}:{self.redis_port}/0"

    @property
    def aws_endpoint(self) -> str:
        return f"http://{HOST}:{self.localstack_port}"

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.api_port}"

    def env(self) -> dict[str, str]:
        """The environment MAOF's processes run with: no MAOF_* setting of the caller (so
        the engine runs on its defaults), this stack's URLs, a mock agent delay."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAOF_")}
        env.update(
            {
                "MAOF_DATABASE_URL": self.database_url,
                "MAOF_REDIS_URL": self.redis_url,
                "MAOF_AWS_ENDPOINT_URL": self.aws_endpoint,
                "MAOF_MOCK_AGENT_DELAY_MS": str(MOCK_AGENT_DELAY_MS),
                "MAOF_LOG_LEVEL": "WARNING",
                "PYTHONUNBUFFERED": "1",
                SESSION_MARKER: str(self.folder),
            }
        )
        return env

    # ---- start and stop

    def start(self) -> ChaosStack:
        atexit.register(self.stop)
        try:
            self.postgres = PostgresServer(
                HOST, self.pg_port, "maof", "maof", local_stack.postgres_dir(self.folder / "pg")
            )
            local_stack.start_postgres_server(self.postgres)
            local_stack.create_database(self.postgres, "maof")
            local_stack.start_redis_server(HOST, self.redis_port, self.folder / "redis")
            self.start_localstack()
            # What `make dev` does: migrate, create the queues and bucket, start the API,
            # publish the dashboard for it, start the poller.
            self._python("-m", "chalicelib.db.migrate")
            self._python("-m", "devstack.stack", "resources")
            self.start_api()
            self._python(
                "-c",
                "import sys; from devstack import dashboard; dashboard.publish(sys.argv[1])",
                self.api_url,
            )
            self.start_poller()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop everything this session started (also after a failure), keep the logs."""
        if self.stopped:
            return
        self.stopped = True
        for process in (*self.stale_pollers, self.poller, self.api):
            _terminate(process)
        teardown_session(self.folder, keep_logs=True)
        if self.localstack is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.localstack.wait(10)

    def _python(self, *args: str) -> None:
        """Run MAOF's interpreter with `args` in this stack's environment, to completion."""
        done = subprocess.run(
            [sys.executable, *args],
            cwd=PROJECT_DIR,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"python {' '.join(args[:2])} failed: {done.stdout}{done.stderr}")

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        with open(self.folder / "logs" / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                [sys.executable, *args],
                cwd=PROJECT_DIR,
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        (self.folder / f"{name}.pid").write_text(str(process.pid))
        return process

    def log_size(self, name: str) -> int:
        path = self.folder / "logs" / f"{name}.log"
        return path.stat().st_size if path.exists() else 0

    def log_since(self, name: str, offset: int) -> str:
        with open(self.folder / "logs" / f"{name}.log", "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def start_localstack(self) -> None:
        folder = self.folder / "localstack"
        self.localstack = local_stack.start_localstack_server(
            self.aws_endpoint,
            folder,
            services="sqs,s3",
            env={
                "LOCALSTACK_HOST": f"{HOST}:{self.localstack_port}",
                SESSION_MARKER: str(self.folder),
            },
        )

    def kill_localstack(self) -> None:
        assert self.localstack is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.localstack.pid, signal.SIGKILL)
        self.localstack.wait(30)

    def start_api(self) -> None:
        self.api = self._spawn("api", ["-m", "devstack.api", "--port", str(self.api_port)])

        def healthy() -> bool:
            assert self.api is not None
            if self.api.poll() is not None:
                raise RuntimeError(f"the API exited: {self.log_since('api', 0)[-2000:]}")
            with contextlib.suppress(requests.RequestException):
                return requests.get(f"{self.api_url}/health", timeout=2).status_code == 200
            return False

        wait_for(healthy, "the chaos API answering /health", 60, 0.2)

    def start_poller(self) -> None:
        offset = self.log_size("poller")
        self.poller = self._spawn("poller", ["-m", "devstack.poller", "--api-url", self.api_url])

        def draining() -> bool:
            assert self.poller is not None
            if self.poller.poll() is not None:
                raise RuntimeError(f"the poller exited: {self.log_since('poller', offset)}")
            return "poller: draining" in self.log_since("poller", offset)

        wait_for(draining, "the chaos poller draining", 60, 0.1)

    def kill_poller(self) -> None:
        assert self.poller is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.poller.pid, signal.SIGKILL)
        self.poller.wait(30)

    # ---- probes

    def postgres_answers(self) -> bool:
        try:
            with psycopg.connect(self.conninfo, connect_timeout=2, autocommit=True) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def redis_answers(self) -> bool:
        client = redis.Redis(host=HOST, port=self.redis_port, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        """Rows of `query` on the chaos database, retried while it restarts."""

        def attempt() -> list[tuple[Any, ...]] | None:
            try:
                with psycopg.connect(self.conninfo, connect_timeout=3, autocommit=True) as conn:
                    return conn.execute(query, params).fetchall()  # type: ignore[arg-type]
            except psycopg.OperationalError:
                return None

        rows: list[tuple[Any, ...]] = wait_for(
            lambda: (found := attempt()) is not None and [found], "the chaos database", 60, 0.5
        )[0]
        return rows

    def s3(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.aws_endpoint,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )


def _terminate(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def teardown_session(session: Path, keep_logs: bool = False) -> None:
    """Stop whatever a session started that still runs (only processes it started, by their
    recorded pids), optionally keep its logs, and delete its folder."""
    for pidfile, group in (
        (session / "poller.pid", False),
        (session / "api.pid", False),
        (session / "localstack" / "localstack.pid", True),
        (session / "redis" / "redis.pid", False),
    ):
        pid = _read_pid(pidfile)
        if pid is None or not _alive(pid) or not _started_by_session(pid, session):
            continue
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            wait_for(lambda pid=pid: not _alive(pid) or _zombie(pid), f"pid {pid} to exit", 10)
    data = local_stack.postgres_dir(session / "pg") / "data"
    if (data / "postmaster.pid").exists():
        local_stack.pg_ctl(data, "-m", "immediate", "-w", "stop")
    if keep_logs and (session / "logs").exists():
        target = ARTIFACTS / "logs"
        target.mkdir(parents=True, exist_ok=True)
        for log in (session / "logs").iterdir():
            shutil.copy(log, target / log.name)
        if (session / "pg" / "postgres.log").exists():
            shutil.copy(session / "pg" / "postgres.log", target / "postgres.log")
    shutil.rmtree(session, ignore_errors=True)
    if data.parent != session / "pg":  # Postgres had to live in /var/tmp (see postgres_dir)
        shutil.rmtree(data.parent, ignore_errors=True)


def _zombie(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().split(") ")[1].startswith("Z")
    except (OSError, IndexError):
        return True


def clean_stale_sessions() -> None:
    """Tear down what sessions whose process is gone left running (a killed test run)."""
    for session in sorted(CHAOS_DIR.glob("session-*")):
        owner = _read_pid(session / "owner.pid")
        if owner is not None and owner != os.getpid() and _alive(owner):
            continue  # another live session (make chaos and make test at once)
        teardown_session(session)


@contextlib.contextmanager
def running_stack() -> Iterator[ChaosStack]:
    stack = ChaosStack.create()
    try:
        yield stack.start()
    finally:
        stack.stop()


# ---------------------------------------------------------------- faults


def no_fault(stack: ChaosStack) -> float:
    return time.time()


def restart_postgres(stack: ChaosStack) -> float:
    """`pg_ctl restart -m immediate`: every backend killed without a checkpoint, crash
    recovery at start-up, every client connection broken."""
    assert stack.postgres is not None
    local_stack.pg_ctl(
        stack.postgres.data,
        "-m",
        "immediate",
        "-w",
        "-t",
        "60",
        "-l",
        str(stack.postgres.log),
        "restart",
        check=True,
    )
    wait_for(stack.postgres_answers, "Postgres answering after its restart", 60, 0.05)
    return time.time()


def bounce_redis(stack: ChaosStack) -> float:
    """Redis stopped, REDIS_OUTAGE_SECONDS without it, then started again, empty."""
    folder = stack.folder / "redis"
    local_stack.stop_pidfile(folder / "redis.pid", "redis")
    time.sleep(REDIS_OUTAGE_SECONDS)  # the outage itself
    local_stack.start_redis_server(HOST, stack.redis_port, folder)
    wait_for(stack.redis_answers, "Redis answering after its restart", 30, 0.05)
    return time.time()


def restart_localstack(stack: ChaosStack) -> float:
    """LocalStack killed and started again: it keeps no state, so the queues (and every
    message in them) and the dashboard bucket are gone when it answers again."""
    stack.kill_localstack()
    stack.start_localstack()
    return time.time()


def kill_worker(stack: ChaosStack) -> float:
    """The poller SIGKILLed mid-batch (its claims, leases and in-flight messages left as
    they were) and a new one started."""
    stack.kill_poller()
    stack.start_poller()
    return time.time()


def _freeze(pids: list[int]) -> float:
    """SIGSTOP `pids` for FREEZE_SECONDS, then SIGCONT: a dependency that hangs (its
    connections open, nothing answered) instead of dying."""
    try:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # a backend that just ended
                os.kill(pid, signal.SIGSTOP)
        time.sleep(FREEZE_SECONDS)  # the freeze itself
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    return time.time()


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants, from /proc (a fresh Debian may lack pgrep)."""
    parents: dict[int, list[int]] = collections.defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # pid (comm) state ppid …: comm may hold spaces and parentheses.
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(fields[1])].append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(current := todo.pop())
        todo.extend(parents[current])
    return found


def freeze_worker(stack: ChaosStack) -> float:
    """The poller SIGSTOPped mid-batch and a new one started, then, FREEZE_SECONDS later,
    the old one SIGCONTed to run on beside it: a worker that pauses (a stalled host, a long
    collection) past its leases and wakes up holding claims, messages and slots that others
    took over meanwhile. Whatever it then writes must be refused."""
    assert stack.poller is not None
    frozen, pids = stack.poller, _tree(stack.poller.pid)
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        stack.start_poller()
        time.sleep(FREEZE_SECONDS)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    stack.stale_pollers.append(frozen)
    return time.time()


def freeze_postgres(stack: ChaosStack) -> float:
    """The postmaster and every backend stopped: connections stay open, nothing answers."""
    assert stack.postgres is not None
    postmaster = int((stack.postgres.data / "postmaster.pid").read_text().split()[0])
    return _freeze(_tree(postmaster))


def freeze_redis(stack: ChaosStack) -> float:
    """Every Redis call hangs until its 0.5 s socket timeout: slots, marks, rate limits."""
    pid = _read_pid(stack.folder / "redis" / "redis.pid")
    assert pid is not None
    return _freeze([pid])


def freeze_localstack(stack: ChaosStack) -> float:
    """SQS and S3 stop answering: sends and receives hang until their read timeouts."""
    assert stack.localstack is not None
    return _freeze(_tree(stack.localstack.pid))


FAULTS: dict[str, Callable[[ChaosStack], float]] = {
    "baseline": no_fault,
    "postgres": restart_postgres,
    "redis": bounce_redis,
    "localstack": restart_localstack,
    "worker": kill_worker,
    "worker-freeze": freeze_worker,
    "postgres-freeze": freeze_postgres,
    "redis-freeze": freeze_redis,
    "localstack-freeze": freeze_localstack,
}


# ---------------------------------------------------------------- one fault, measured


@dataclass
class FaultResult:
    fault: str
    accepted: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    stuck: int = 0
    recovery_seconds: float | None = None
    outage_seconds: float = 0.0
    open_at_fault: int = 0  # runs stored and not ended when the fault began
    ended_during: int = 0  # of those and the runs submitted during it: ended before it was over
    progress_at_fault: float = 0.0
    answers: dict[str, int] = field(default_factory=dict)  # HTTP status (or error) → count
    stored_not_accepted: list[str] = field(default_factory=list)
    accepted_not_stored: list[str] = field(default_factory=list)
    double_executes: list[str] = field(default_factory=list)
    completed_without_one_execute_each: list[str] = field(default_factory=list)
    counted_twice: list[str] = field(default_factory=list)  # StagesFinished metric lines
    started_after_end: list[str] = field(default_factory=list)
    activity_after_end: list[str] = field(default_factory=list)
    invalid_chains: list[str] = field(default_factory=list)
    dashboard_restored: bool | None = None
    notes: list[str] = field(default_factory=list)
    stuck_after_seconds: float = STUCK_AFTER_SECONDS

    def problems(self) -> list[str]:
        """Every broken invariant, one line each (empty: the fault was survived)."""
        found: list[str] = []
        if not self.accepted:
            found.append("no submission was accepted: the harness, not MAOF, needs fixing")
        if not 0 < self.progress_at_fault < 1:
            found.append(
                f"the fault did not hit a drain in progress ({self.progress_at_fault:.0%} of "
                "the stages were done): the harness, not MAOF, needs fixing"
            )
        if self.stuck:
            found.append(
                f"{self.stuck} runs stuck: not ended {self.stuck_after_seconds:.0f}s after "
                "the dependency answered again"
            )
        elif self.recovery_seconds is None or self.recovery_seconds > RECOVERY_LIMIT_SECONDS:
            found.append(
                f"recovery took {self.recovery_seconds}s, more than {RECOVERY_LIMIT_SECONDS:.0f}s"
            )
        others = {k: v for k, v in self.answers.items() if k not in ("202", "503")}
        if others:
            found.append(
                f"submissions answered {others}: only 202 (stored, will end) or 503 (stored "
                "nothing) tell a client where it stands"
            )
        for label, items in (
            ("runs stored without a 202", self.stored_not_accepted),
            ("runs answered 202 but not stored", self.accepted_not_stored),
            ("stages with two or more execute entries", self.double_executes),
            (
                "completed runs without exactly one execute per stage",
                self.completed_without_one_execute_each,
            ),
            ("stages counted finished twice in the metrics", self.counted_twice),
            ("stages started after their run ended", self.started_after_end),
            ("audit entries after the run ended", self.activity_after_end),
            ("audit chains that do not verify", self.invalid_chains),
        ):
            if items:
                found.append(f"{len(items)} {label}: {', '.join(items[:5])}")
        if self.ended_during < WORK_GOES_ON.get(self.fault, 0) * self.open_at_fault:
            found.append(
                f"only {self.ended_during} of {self.open_at_fault} open runs ended while the "
                "dependency was away: work must go on without it"
            )
        if self.dashboard_restored is False:
            found.append("the dashboard was not back in its bucket after LocalStack restarted")
        found += self.notes
        return found

    def summary(self) -> str:
        problems = self.problems()
        lines = [f"{self.fault}: " + ("ok" if not problems else f"{len(problems)} problems")]
        lines += [f"  - {problem}" for problem in problems]
        return "\n".join(lines)


@dataclass
class Submitter:
    """Submits three-stage runs as one user and records every answer."""

    api_url: str
    token: str
    answers: list[tuple[str, str | None]] = field(default_factory=list)  # (status, run ref)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def submit(self, _: object = None) -> None:
        stages = [
            {
                "id": capability,
                "name": capability.title(),
                "agentCapability": capability,
                "dependencies": [CAPABILITIES[i - 1]] if i else [],
            }
            for i, capability in enumerate(CAPABILITIES)
        ]
        body = {"workflow": {"name": "chaos", "stages": stages}, "input": {"text": "chaos"}}
        try:
            response = requests.post(
                f"{self.api_url}/workflows/execute",
                json=body,
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=SUBMIT_TIMEOUT_SECONDS,
            )
            status = str(response.status_code)
            ref = response.json()["data"]["workflowRunId"] if status == "202" else None
        except (requests.RequestException, ValueError, KeyError) as exc:
            status, ref = f"no answer ({type(exc).__name__})", None
        with self.lock:
            self.answers.append((status, ref))

    def keep_submitting(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.submit()
            stop.wait(SUBMIT_EVERY_SECONDS)

    def accepted(self) -> set[str]:
        with self.lock:
            return {ref.removeprefix("wfr-") for status, ref in self.answers if ref}


def sign_up(api_url: str, label: str) -> tuple[str, str]:
    """A new user (its token and id) with a mock agent serving every capability."""
    email = f"chaos-{label}-{uuid.uuid4().hex[:8]}@example.com"
    password = "chaos-password-123"
    created = requests.post(
        f"{api_url}/auth/register",
        json={"email": email, "password": password, "name": "Chaos"},
        timeout=30,
    )
    created.raise_for_status()
    login = requests.post(
        f"{api_url}/auth/login", json={"email": email, "password": password}, timeout=30
    )
    login.raise_for_status()
    data = login.json()["data"]
    agent = requests.post(
        f"{api_url}/agents/register",
        json={
            "agentId": f"chaos-{label}-{uuid.uuid4().hex[:6]}",
            "name": "Chaos mock agent",
            "endpoint": "mock://chaos",
            "authToken": "chaos-agent-token",
            "capabilities": list(CAPABILITIES),
            "maxConcurrentTasks": AGENT_SLOTS,
        },
        headers={"Authorization": f"Bearer {data['accessToken']}"},
        timeout=30,
    )
    agent.raise_for_status()
    return str(data["accessToken"]), str(data["user"]["userUuid"])


def run_fault(
    stack: ChaosStack, fault: str, stuck_after: float = STUCK_AFTER_SECONDS
) -> FaultResult:
    """Drain RUNS_BEFORE_FAULT runs (and those submitted during the fault), inject `fault`
    mid-drain, wait for every run to end, and measure (see the module docstring)."""
    inject = FAULTS[fault]
    result = FaultResult(fault, stuck_after_seconds=stuck_after)
    _revive(stack)
    poller_log = stack.log_size("poller")
    token, user_id = sign_up(stack.api_url, fault)
    submitter = Submitter(stack.api_url, token)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(submitter.submit, range(RUNS_BEFORE_FAULT)))

    def progress() -> tuple[int, int]:
        done, total = stack.sql(
            "SELECT count(*) FILTER (WHERE s.status = 'completed'), count(*) "
            "FROM stage_executions s JOIN workflow_runs r ON r.id = s.run_id "
            "WHERE r.user_id = %s",
            user_id,
        )[0]
        return int(done), int(total)

    with contextlib.suppress(TimeoutError):
        wait_for(
            lambda: (p := progress())[0] >= FAULT_AT_PROGRESS * max(p[1], 1),
            "the drain under way",
            60,
            0.1,
        )
    done, total = progress()
    result.progress_at_fault = done / total if total else 0.0

    stop = threading.Event()
    during = threading.Thread(target=submitter.keep_submitting, args=(stop,), daemon=True)
    t_fault = time.time()
    during.start()
    try:
        t_back = inject(stack)
        stop.wait(1.0)  # a second of submissions against the dependency just back
    finally:
        stop.set()
        during.join(SUBMIT_TIMEOUT_SECONDS + 5)
    result.outage_seconds = round(t_back - t_fault, 1)

    def open_runs() -> int:
        return int(
            stack.sql(
                "SELECT count(*) FROM workflow_runs WHERE user_id = %s AND status <> ALL(%s)",
                user_id,
                list(TERMINAL),
            )[0][0]
        )

    with contextlib.suppress(TimeoutError):
        wait_for(lambda: open_runs() == 0, "every run ended", t_back + stuck_after - time.time())
    _measure(stack, result, submitter, user_id, (t_fault, t_back))
    result.counted_twice = _counted_twice(stack.log_since("poller", poller_log))
    if fault == "localstack":
        result.dashboard_restored = _dashboard_back(stack, t_back + stuck_after)
    _check_processes(stack, result)
    while stack.stale_pollers:  # the next fault starts with one poller
        _terminate(stack.stale_pollers.pop())
    _write_artifact(stack, result, user_id)
    RESULTS.append(result)
    return result


def _measure(
    stack: ChaosStack,
    result: FaultResult,
    submitter: Submitter,
    user_id: str,
    outage: tuple[float, float],
) -> None:
    t_fault, t_back = outage
    result.answers = dict(collections.Counter(status for status, _ in submitter.answers))
    accepted = submitter.accepted()
    result.accepted = len(accepted)
    runs = stack.sql(
        "SELECT id::text, status, EXTRACT(EPOCH FROM completed_at), "
        "EXTRACT(EPOCH FROM created_at) FROM workflow_runs WHERE user_id = %s",
        user_id,
    )
    result.open_at_fault = sum(
        1
        for _, _, end, created in runs
        if float(created) < t_fault and (end is None or float(end) > t_fault)
    )
    runs = [(run_id, status, end) for run_id, status, end, _ in runs]
    stored = {run_id for run_id, _, _ in runs}
    result.stored_not_accepted = sorted(stored - accepted)
    result.accepted_not_stored = sorted(accepted - stored)
    statuses = collections.Counter(status for _, status, _ in runs)
    result.completed = statuses["completed"]
    result.failed = statuses["failed"]
    result.cancelled = statuses["cancelled"]
    result.stuck = sum(n for status, n in statuses.items() if status not in TERMINAL)
    ends = [float(end) for run_id, _, end in runs if run_id in accepted and end is not None]
    result.ended_during = sum(1 for end in ends if t_fault <= end <= t_back)
    if not result.stuck and ends:
        result.recovery_seconds = round(max(0.0, max(ends) - t_back), 1)
    result.double_executes = [
        f"{run}/{stage} x{n}"
        for run, stage, n in stack.sql(
            "SELECT e.run_id::text, e.stage_id, count(*) FROM execution_logs e "
            "JOIN workflow_runs r ON r.id = e.run_id "
            "WHERE r.user_id = %s AND e.action = 'execute' "
            "GROUP BY 1, 2 HAVING count(*) > 1",
            user_id,
        )
    ]
    result.completed_without_one_execute_each = [
        f"{run}/{stage}"
        for run, stage in stack.sql(
            "SELECT r.id::text, s.stage_id FROM workflow_runs r "
            "JOIN stage_executions s ON s.run_id = r.id "
            "WHERE r.user_id = %s AND r.status = 'completed' AND (SELECT count(*) "
            "FROM execution_logs e WHERE e.run_id = r.id AND e.stage_id = s.stage_id "
            "AND e.action = 'execute') <> 1",
            user_id,
        )
    ]
    result.started_after_end = [
        f"{run}/{stage}"
        for run, stage in stack.sql(
            "SELECT r.id::text, s.stage_id FROM stage_executions s "
            "JOIN workflow_runs r ON r.id = s.run_id "
            "WHERE r.user_id = %s AND s.started_at > r.completed_at",
            user_id,
        )
    ]
    # A run ends with its `complete` entry, or with the `fail` of the stage that failed it
    # (these pipelines are linear: nothing else runs beside it); only `skip` may follow.
    result.activity_after_end = [
        f"{run}/{stage}:{action}"
        for run, stage, action in stack.sql(
            "WITH ends AS (SELECT e.run_id, min(e.seq) AS seq FROM execution_logs e "
            "JOIN workflow_runs r ON r.id = e.run_id WHERE r.user_id = %s "
            "AND e.action IN ('complete', 'fail') GROUP BY e.run_id) "
            "SELECT e.run_id::text, e.stage_id, e.action FROM execution_logs e "
            "JOIN ends ON ends.run_id = e.run_id WHERE e.seq > ends.seq AND e.action <> 'skip'",
            user_id,
        )
    ]
    result.invalid_chains = _invalid_chains(stack.api_url, submitter.token, sorted(accepted))


def _counted_twice(log: str) -> list[str]:
    """Stages with more than one StagesFinished metric line in the pollers' log: a stage
    finishes once, whichever worker (a stale one too) gets to the end of it."""
    counts: collections.Counter[str] = collections.Counter()
    for line in log.splitlines():
        if line.startswith("{") and '"StagesFinished"' in line:
            with contextlib.suppress(ValueError, KeyError):
                metric = json.loads(line)
                counts[f"{metric['runId']}/{metric['stageId']}"] += 1
    return sorted(f"{stage} x{n}" for stage, n in counts.items() if n > 1)


def _invalid_chains(api_url: str, token: str, run_ids: list[str]) -> list[str]:
    def valid(run_id: str) -> bool:
        try:
            response = requests.get(
                f"{api_url}/workflows/wfr-{run_id}/audit",
                headers={"Authorization": f"Bearer {token}"},
                timeout=30,
            )
            return bool(response.json()["data"]["chain"]["valid"])
        except (requests.RequestException, ValueError, KeyError, TypeError):
            return False

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        verdicts = list(pool.map(valid, run_ids))
    return [run_id for run_id, ok in zip(run_ids, verdicts, strict=True) if not ok]


def _dashboard_back(stack: ChaosStack, deadline: float) -> bool:
    """Whether the dashboard (its index and a config.json naming the API) is in its bucket
    again, waiting until `deadline` for the poller to have put it back."""
    s3 = stack.s3()

    def back() -> bool:
        try:
            s3.head_object(Bucket="maof-dashboard", Key="index.html")
            config = s3.get_object(Bucket="maof-dashboard", Key="config.json")["Body"].read()
            return bool(json.loads(config).get("apiUrl") == stack.api_url)
        except Exception:
            return False

    try:
        return bool(wait_for(back, "the dashboard re-published", max(1.0, deadline - time.time())))
    except TimeoutError:
        return False


def _revive(stack: ChaosStack) -> None:
    """A fault starts from a working stack: restart what an earlier fault killed (that
    fault's result already says so)."""
    if stack.api is not None and stack.api.poll() is not None:
        stack.start_api()
    if stack.poller is not None and stack.poller.poll() is not None:
        stack.start_poller()


def _check_processes(stack: ChaosStack, result: FaultResult) -> None:
    for name, process in (("API", stack.api), ("poller", stack.poller)):
        if process is not None and process.poll() is not None:
            result.notes.append(f"the {name} exited during the fault ({process.returncode})")


def _write_artifact(stack: ChaosStack, result: FaultResult, user_id: str) -> None:
    """Per run: when it was accepted and ended, and each stage's times, for whoever has to
    find out why a run took long."""
    rows = stack.sql(
        "SELECT r.id::text, r.status, r.created_at::text, r.completed_at::text, r.error_message, "
        "json_agg(json_build_object('stageId', s.stage_id, 'status', s.status, "
        "'attempt', s.attempt, 'queuedAt', s.queued_at, 'startedAt', s.started_at, "
        "'completedAt', s.completed_at) ORDER BY s.position) "
        "FROM workflow_runs r JOIN stage_executions s ON s.run_id = r.id "
        "WHERE r.user_id = %s GROUP BY r.id ORDER BY r.created_at",
        user_id,
    )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    document = {
        "result": asdict(result),
        "problems": result.problems(),
        "runs": [
            {
                "runId": f"wfr-{run_id}",
                "status": status,
                "createdAt": created,
                "endedAt": ended,
                "errorMessage": error,
                "stages": stages,
            }
            for run_id, status, created, ended, error, stages in rows
        ],
    }
    (ARTIFACTS / f"{result.fault}.json").write_text(json.dumps(document, indent=1, default=str))


# ---------------------------------------------------------------- the table


def table(results: list[FaultResult]) -> str:
    header = (
        "fault",
        "accepted",
        "completed",
        "failed",
        "stuck",
        "recovery s",
        "outage s",
        "open at it",
        "ended in it",
        "503s",
    )
    rows = [
        (
            r.fault,
            str(r.accepted),
            str(r.completed),
            str(r.failed),
            str(r.stuck),
            f"{r.recovery_seconds:.1f}"
            if r.recovery_seconds is not None
            else f">{r.stuck_after_seconds:.0f}",
            f"{r.outage_seconds:.1f}",
            str(r.open_at_fault),
            str(r.ended_during),
            str(r.answers.get("503", 0)),
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )

    out = [line(header), line(tuple("-" * w for w in widths)), *map(line, rows), ""]
    out.append(
        f"recovery: from the dependency answering again until the last accepted run ended "
        f"(target {RECOVERY_TARGET_SECONDS:.0f}s, asserted <= {RECOVERY_LIMIT_SECONDS:.0f}s); "
        "stuck: not ended by then + the deadline; open at it: runs not ended when the fault "
        "began; ended in it: runs that ended during the outage; 503s: submissions refused "
        "during the fault"
    )
    out += [r.summary() for r in results]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.faults.chaos",
        description="Inject outages mid-drain on an isolated local stack; print what ended.",
    )
    parser.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help=f"comma-separated, from {', '.join(FAULTS)} (default: all)",
    )
    parser.add_argument(
        "--stuck-after",
        type=float,
        default=STUCK_AFTER_SECONDS,
        help="seconds after the dependency is back before an open run counts as stuck",
    )
    args = parser.parse_args(argv)
    faults = [name.strip() for name in args.faults.split(",") if name.strip()]
    unknown = [name for name in faults if name not in FAULTS]
    if unknown:
        parser.error(f"unknown faults: {', '.join(unknown)}")
    with running_stack() as stack:
        print(f"chaos: stack up in {stack.folder}", flush=True)
        for fault in faults:
            print(f"chaos: {fault} …", flush=True)
            result = run_fault(stack, fault, args.stuck_after)
            print(result.summary(), flush=True)
    print()
    print(table(RESULTS))
    print(f"\nper-run records and logs: {ARTIFACTS}")
    return 1 if any(result.problems() for result in RESULTS) else 0


if __name__ == "__main__":
    raise SystemExit(main())
