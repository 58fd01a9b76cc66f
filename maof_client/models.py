"""Typed views of the API's answers: each keeps the API's own `data` in `raw`."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

ENDED_RUN_STATUSES = ("completed", "failed", "cancelled")


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


# What a terminal would act on rather than show: controls (Cc: C0 but tab and newline, DEL,
# and C1; escape sequences start with ESC, or with C1's CSI), format characters (Cf: bidi
# overrides and isolates that show text reversed, zero-width characters) and line and
# paragraph separators (Zl, Zp); and lone surrogates (Cs: JSON's "\ud800" reads as one, and
# no output encoding can write it). An agent's words reach these strings (a stage's error,
# an agent's name): shown as "?"; `raw` keeps the API's own.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_KEPT = "\t\n"


def hidden(char: str) -> bool:
    """Whether a terminal would act on `char` rather than show it (tab, newline apart)."""
    return char not in _KEPT and unicodedata.category(char) in _HIDDEN_CATEGORIES


def shown(value: Any) -> str:
    """`value` as text fit for a terminal: every control, format (bidi, zero-width), lone
    surrogate and line or paragraph separator character but tab and newline replaced by
    "?"."""
    text = str(value)
    if text.isprintable():  # the usual case: none of them (nor tab or newline) is there
        return text
    return "".join("?" if hidden(char) else char for char in text)


def _str(value: Any) -> str | None:
    return None if value is None else shown(value)


def _stage_ids(value: Any) -> list[str] | None:
    return [shown(s) for s in value] if isinstance(value, list) else None


@dataclass(frozen=True)
class Tokens:
    """A session's token pair. The refresh token rotates on every refresh: keep the newest
    and never present one twice (the API then ends the session)."""

    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    email: str | None = None


@dataclass(frozen=True)
class User:
    user_uuid: str
    email: str
    name: str
    role: str
    created_at: datetime | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> User:
        return cls(
            user_uuid=shown(data["userUuid"]),
            email=shown(data["email"]),
            name=shown(data.get("name") or ""),
            role=shown(data.get("role") or "user"),
            created_at=_time(data.get("createdAt")),
            raw=data,
        )


@dataclass(frozen=True)
class SignIn:
    """What login, refresh and a password change answer: a new token pair and the user.
    `raw` is the API's data without the tokens, safe to print."""

    tokens: Tokens
    user: User
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> SignIn:
        user = User.from_api(data["user"])
        tokens = Tokens(str(data["accessToken"]), str(data["refreshToken"]), user.email)
        safe = {k: v for k, v in data.items() if k not in ("accessToken", "refreshToken")}
        return cls(tokens=tokens, user=user, raw=safe)


@dataclass(frozen=True)
class PageMeta:
    total: int
    page: int
    limit: int
    pages: int

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> PageMeta:
        return cls(
            total=int(data.get("total", 0)),
            page=int(data.get("page", 1)),
            limit=int(data.get("limit", 0)),
            pages=int(data.get("pages", 0)),
        )


@dataclass(frozen=True)
class Agent:
    """An agent; `endpoint` and `owner_user_uuid` are None on another user's shared agent."""

    agent_uuid: str
    agent_id: str
    name: str
    description: str | None
    endpoint: str | None
    capabilities: list[str]
    max_concurrent_tasks: int
    status: str
    visibility: str
    last_health_check: datetime | None
    owner_user_uuid: str | None
    created_at: datetime | None
    updated_at: datetime | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Agent:
        return cls(
            agent_uuid=shown(data["agentUuid"]),
            agent_id=shown(data["agentId"]),
            name=shown(data.get("name") or ""),
            description=_str(data.get("description")),
            endpoint=_str(data.get("endpoint")),
            capabilities=[shown(c) for c in data.get("capabilities") or []],
            max_concurrent_tasks=int(data.get("maxConcurrentTasks") or 0),
            status=shown(data.get("status") or ""),
            visibility=shown(data.get("visibility") or "private"),
            last_health_check=_time(data.get("lastHealthCheck")),
            owner_user_uuid=_str(data.get("ownerUserUuid")),
            created_at=_time(data.get("createdAt")),
            updated_at=_time(data.get("updatedAt")),
            raw=data,
        )


@dataclass(frozen=True)
class AgentPage:
    agents: list[Agent]
    meta: PageMeta
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> AgentPage:
        return cls(
            agents=[Agent.from_api(a) for a in data.get("agents") or []],
            meta=PageMeta.from_api(data.get("meta") or {}),
            raw=data,
        )


@dataclass(frozen=True)
class Submission:
    """The answer to a submission: the run's id and its status (`queued`, or the status of
    the run an Idempotency-Key already made)."""

    workflow_run_id: str
    status: str
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Submission:
        return cls(shown(data["workflowRunId"]), shown(data["status"]), data)


@dataclass(frozen=True)
class Progress:
    total: int
    completed: int
    failed: int
    current: str | None = None

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Progress:
        return cls(
            total=int(data.get("total", 0)),
            completed=int(data.get("completed", 0)),
            failed=int(data.get("failed", 0)),
            current=_str(data.get("current")),
        )


@dataclass(frozen=True)
class Stage:
    """One stage of a run. Status: pending, queued, in_progress, completed, failed,
    skipped or cancelled."""

    stage_id: str
    name: str
    agent_capability: str
    dependencies: list[str]
    status: str
    agent_id: str | None
    agent_uuid: str | None
    attempt: int | None
    input: Any
    output: Any
    error_message: str | None
    queued_at: datetime | None
    started_at: datetime | None
    completed_at: datetime | None
    duration_ms: int | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Stage:
        return cls(
            stage_id=shown(data["stageId"]),
            name=shown(data.get("name") or ""),
            agent_capability=shown(data.get("agentCapability") or ""),
            dependencies=[shown(d) for d in data.get("dependencies") or []],
            status=shown(data.get("status") or ""),
            agent_id=_str(data.get("agentId")),
            agent_uuid=_str(data.get("agentUuid")),
            attempt=_int(data.get("attempt")),
            input=data.get("input"),
            output=data.get("output"),
            error_message=_str(data.get("errorMessage")),
            queued_at=_time(data.get("queuedAt")),
            started_at=_time(data.get("startedAt")),
            completed_at=_time(data.get("completedAt")),
            duration_ms=_int(data.get("durationMs")),
            raw=data,
        )


@dataclass(frozen=True)
class CallbackStatus:
    """Where a run's outcome is delivered and how that went (the secret is never shown)."""

    url: str
    state: str | None
    attempts: int
    last_error: str | None

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> CallbackStatus:
        return cls(
            url=shown(data.get("url") or ""),
            state=_str(data.get("state")),
            attempts=int(data.get("attempts") or 0),
            last_error=_str(data.get("lastError")),
        )


@dataclass(frozen=True)
class RunSummary:
    """A run as `GET /workflows` lists it. Status: queued, in_progress, completed, failed
    or cancelled."""

    workflow_run_id: str
    workflow_name: str
    status: str
    progress: Progress
    created_at: datetime | None
    started_at: datetime | None
    completed_at: datetime | None
    error_message: str | None
    deadline_at: datetime | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def ended(self) -> bool:
        return self.status in ENDED_RUN_STATUSES

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> RunSummary:
        return cls(
            workflow_run_id=shown(data["workflowRunId"]),
            workflow_name=shown(data.get("workflowName") or ""),
            status=shown(data.get("status") or ""),
            progress=Progress.from_api(data.get("progress") or {}),
            created_at=_time(data.get("createdAt")),
            started_at=_time(data.get("startedAt")),
            completed_at=_time(data.get("completedAt")),
            error_message=_str(data.get("errorMessage")),
            deadline_at=_time(data.get("deadlineAt")),
            raw=data,
        )


@dataclass(frozen=True)
class Run(RunSummary):
    """A run with its input, stages and callback, as `GET /workflows/{runId}` shows it."""

    input: Any = None
    callback: CallbackStatus | None = None
    stages: list[Stage] = field(default_factory=list)

    @property
    def failed_stages(self) -> list[Stage]:
        return [stage for stage in self.stages if stage.status == "failed"]

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Run:
        summary = RunSummary.from_api(data)
        callback = data.get("callback")
        return cls(
            **{name: getattr(summary, name) for name in RunSummary.__dataclass_fields__},
            input=data.get("input"),
            callback=CallbackStatus.from_api(callback) if isinstance(callback, dict) else None,
            stages=[Stage.from_api(s) for s in data.get("stages") or []],
        )


@dataclass(frozen=True)
class RunPage:
    runs: list[RunSummary]
    meta: PageMeta
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> RunPage:
        return cls(
            runs=[RunSummary.from_api(r) for r in data.get("runs") or []],
            meta=PageMeta.from_api(data.get("meta") or {}),
            raw=data,
        )


@dataclass(frozen=True)
class RunResult:
    """A completed run's output: the final stage's, or an object of the outputs of every
    stage nothing depends on, keyed by stage id."""

    workflow_run_id: str
    output: Any
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> RunResult:
        return cls(shown(data["workflowRunId"]), data.get("output"), data)


@dataclass(frozen=True)
class RunControl:
    """The answer to cancel (`stages_cancelled`: the stages it ended before they started)
    or retry (`stages_requeued`): stage ids."""

    workflow_run_id: str
    status: str
    stages_cancelled: list[str] | None
    stages_requeued: list[str] | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> RunControl:
        return cls(
            workflow_run_id=shown(data["workflowRunId"]),
            status=shown(data.get("status") or ""),
            stages_cancelled=_stage_ids(data.get("stagesCancelled")),
            stages_requeued=_stage_ids(data.get("stagesRequeued")),
            raw=data,
        )


@dataclass(frozen=True)
class AuditEntry:
    """One entry of a run's hash chain; `entry_hash` is its `hash` (docs/audit.md)."""

    seq: int
    stage_id: str | None
    agent_id: str | None
    action: str
    status: str | None
    input_hash: str | None
    output_hash: str | None
    details: Any
    logged_at: datetime | None
    prev_hash: str
    entry_hash: str
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> AuditEntry:
        return cls(
            seq=int(data["seq"]),
            stage_id=_str(data.get("stageId")),
            agent_id=_str(data.get("agentId")),
            action=shown(data.get("action") or ""),
            status=_str(data.get("status")),
            input_hash=_str(data.get("inputHash")),
            output_hash=_str(data.get("outputHash")),
            details=data.get("details"),
            logged_at=_time(data.get("loggedAt")),
            prev_hash=shown(data.get("prevHash") or ""),
            # An API from before the signed trail called it entryHash.
            entry_hash=shown(data.get("hash") or data.get("entryHash") or ""),
            raw=data,
        )


@dataclass(frozen=True)
class AuditChain:
    """The API's own verification of the chain: `valid`, the last entry's hash (`head`),
    and where it stops holding (`broken_at_seq`)."""

    valid: bool
    head: str | None
    length: int
    broken_at_seq: int | None

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> AuditChain:
        return cls(
            valid=bool(data.get("valid")),
            head=_str(data.get("head")),
            length=int(data.get("length") or 0),
            broken_at_seq=_int(data.get("brokenAtSeq")),
        )


@dataclass(frozen=True)
class AuditTrail:
    workflow_run_id: str
    logs: list[AuditEntry]
    chain: AuditChain
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> AuditTrail:
        return cls(
            workflow_run_id=shown(data["workflowRunId"]),
            logs=[AuditEntry.from_api(e) for e in data.get("logs") or []],
            chain=AuditChain.from_api(data.get("chain") or {}),
            raw=data,
        )


@dataclass(frozen=True)
class AgentStats:
    """One agent's stages that ended in the window; the durations of its completed ones
    (None when it completed none)."""

    agent_uuid: str | None
    agent_id: str
    completed: int
    failed: int
    stage_p50_ms: int | None
    stage_p95_ms: int | None

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> AgentStats:
        return cls(
            agent_uuid=_str(data.get("agentUuid")),
            agent_id=shown(data["agentId"]),
            completed=int(data["completed"]),
            failed=int(data["failed"]),
            stage_p50_ms=_int(data.get("stageP50Ms")),
            stage_p95_ms=_int(data.get("stageP95Ms")),
        )


@dataclass(frozen=True)
class Stats:
    """Your runs and stages by status over the last `window`, and per agent."""

    window: str
    runs: dict[str, int]
    stages: dict[str, int]
    agents: list[AgentStats]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Stats:
        return cls(
            window=shown(data["window"]),
            runs={shown(status): int(n) for status, n in data["runs"].items()},
            stages={shown(status): int(n) for status, n in data["stages"].items()},
            agents=[AgentStats.from_api(agent) for agent in data["agents"]],
            raw=data,
        )


@dataclass(frozen=True)
class Health:
    """`status` is `ok`, or `degraded` with the disconnected services in `services`."""

    status: str
    version: str | None
    services: dict[str, str]
    timestamp: datetime | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Health:
        return cls(
            status=shown(data.get("status") or ""),
            version=_str(data.get("version")),
            services={shown(k): shown(v) for k, v in (data.get("services") or {}).items()},
            timestamp=_time(data.get("timestamp")),
            raw=data,
        )
