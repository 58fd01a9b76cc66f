"""The bodies the API answers with, as pydantic models: the views build them and /openapi
documents them (app.py declares each endpoint's `response=`), so the two cannot drift.

Keys are camelCase, as in requests. A field is always in the body, null when it has no
value, except the few typed `... | Absent`: those are left out when the view gives them no
value (an agent's endpoint, shown to its owner only; an error's details). The envelope
itself, `{"success": true, "data": ...}`, is added by chalicelib.http.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from pydantic.json_schema import SkipJsonSchema

RunStatus = Literal["queued", "in_progress", "completed", "failed", "cancelled"]
StageStatus = Literal[
    "pending", "queued", "waiting", "in_progress", "completed", "failed", "skipped", "cancelled"
]
AgentStatus = Literal["online", "degraded", "offline"]
Visibility = Literal["private", "shared"]
Role = Literal["user", "admin"]

# A field that is left out of the body, never null, when the view gives it no value.
Absent = SkipJsonSchema[None]


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)  # "default": null would contradict the field's own type


def omitted() -> Any:
    """The default of an `Absent` field."""
    return Field(default=None, json_schema_extra=_no_default)


class ResponseModel(BaseModel):
    """Base of response bodies: camelCase keys; unknown keys refused (a typo fails loudly)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class SignedDocument(ResponseModel):
    """An object whose `hash` covers every member: served exactly as stored, members this
    model does not name included (they are hashed too)."""

    model_config = ConfigDict(extra="allow")


def plain(value: Any) -> Any:
    """A view's answer as JSON takes it: a model becomes its camelCase dict (without the
    `Absent` fields it was given no value for); datetimes and UUIDs are left to
    chalicelib.http.dumps, which writes them as it always has."""
    if isinstance(value, BaseModel):
        return value.model_dump(by_alias=True, exclude_unset=True)
    return value


# ------------------------------------------------------------------ errors and paging


class FieldError(ResponseModel):
    field: str  # dotted camelCase path: `workflow.stages.0.id`, `body`, `Idempotency-Key`
    message: str


class RetryAfter(ResponseModel):
    retry_after_seconds: int


class ErrorBody(ResponseModel):
    code: str
    message: str
    details: list[FieldError] | RetryAfter | Absent = omitted()
    request_id: str


class ErrorEnvelope(ResponseModel):
    """Every error: `{"success": false, "error": {code, message, details?, requestId}}`."""

    success: Literal[False]
    error: ErrorBody


class PageMeta(ResponseModel):
    total: int
    page: int
    limit: int
    pages: int


# ------------------------------------------------------------------ health and docs


class Services(ResponseModel):
    database: Literal["connected", "disconnected"]
    redis: Literal["connected", "disconnected"]
    queue: Literal["connected", "disconnected"]


class Health(ResponseModel):
    status: Literal["ok", "degraded"]
    timestamp: datetime
    version: str
    services: Services


class HealthDegraded(ResponseModel):
    """/health's 503: the error, and the health report as data all the same."""

    success: Literal[False]
    data: Health
    error: ErrorBody


class OpenApiDocument(ResponseModel):
    """GET /openapi answers the document itself, without the envelope."""

    model_config = ConfigDict(extra="allow")

    openapi: str
    info: dict[str, Any]
    paths: dict[str, Any]
    components: dict[str, Any]


# ------------------------------------------------------------------ accounts


class User(ResponseModel):
    user_uuid: uuid.UUID
    email: str
    name: str
    role: Role
    created_at: datetime


class SignedIn(ResponseModel):
    """A new token pair (a new session, or the next tokens of one) and whose it is."""

    access_token: str
    refresh_token: str
    user: User


class SessionsEnded(ResponseModel):
    sessions_ended: int


# ------------------------------------------------------------------ agents


class Agent(ResponseModel):
    """An agent; its auth token is never shown, and a shared agent seen by someone other
    than its owner shows neither its endpoint nor its owner."""

    agent_uuid: uuid.UUID
    agent_id: str
    name: str
    description: str | None
    endpoint: str | Absent = omitted()
    capabilities: list[str]
    max_concurrent_tasks: int
    status: AgentStatus
    visibility: Visibility
    last_health_check: datetime | None
    owner_user_uuid: uuid.UUID | Absent = omitted()
    created_at: datetime
    updated_at: datetime


class AgentList(ResponseModel):
    agents: list[Agent]
    meta: PageMeta


class AgentDeleted(ResponseModel):
    agent_uuid: str  # as the request named it
    deleted: Literal[True]


# ------------------------------------------------------------------ workflow runs


class Submitted(ResponseModel):
    """A run accepted (or, for a repeated Idempotency-Key, the run it made, as it is now)."""

    workflow_run_id: str
    status: RunStatus


class RunSummary(ResponseModel):
    workflow_run_id: str
    workflow_name: str
    status: RunStatus
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    error_message: str | None
    deadline_at: datetime | None


class StageCounts(ResponseModel):
    total: int
    completed: int
    failed: int


class Progress(StageCounts):
    current: str | None  # the stage in progress, if any


class ListedRun(RunSummary):
    progress: StageCounts


class RunList(ResponseModel):
    runs: list[ListedRun]
    meta: PageMeta


class CallbackStatus(ResponseModel):
    """Where the run's outcome is delivered and how that went (the secret is never shown)."""

    url: str
    state: Literal["pending", "delivered", "failed"] | None
    attempts: int
    last_error: str | None


class Stage(ResponseModel):
    stage_id: str
    name: str
    agent_capability: str
    dependencies: list[str]
    status: StageStatus
    agent_id: str | None
    agent_uuid: uuid.UUID | None
    attempt: int
    input: Any
    output: Any
    error_message: str | None
    queued_at: datetime | None
    started_at: datetime | None
    completed_at: datetime | None
    duration_ms: int | None


class Run(RunSummary):
    progress: Progress
    input: Any
    callback: CallbackStatus | None
    stages: list[Stage]


class RunResult(ResponseModel):
    workflow_run_id: str
    output: Any


class Cancelled(ResponseModel):
    workflow_run_id: str
    status: Literal["cancelled"]
    stages_cancelled: list[str]


class Retried(ResponseModel):
    workflow_run_id: str
    status: Literal["in_progress"]
    stages_requeued: list[str]


class AgentStats(ResponseModel):
    # One row per agent: an agentId may name several (yours and a shared one, or one
    # deleted and registered again), the agentUuid tells them apart.
    agent_uuid: uuid.UUID | None
    agent_id: str
    completed: int
    failed: int
    stage_p50_ms: int | None
    stage_p95_ms: int | None


class Stats(ResponseModel):
    window: str
    runs: dict[RunStatus, int]
    stages: dict[StageStatus, int]
    agents: list[AgentStats]


# ------------------------------------------------------------------ the audit trail


class AuditEntry(SignedDocument):
    """One entry of a run's chain, exactly as hashed (docs/audit.md)."""

    version: int
    run_id: str
    seq: int
    stage_id: str | None
    agent_id: str | None
    action: str
    status: str
    input_hash: str | None
    output_hash: str | None
    details: dict[str, Any] | None
    logged_at: str
    prev_hash: str
    kid: str | None  # None (and no signature) for entries written before signing (version 1)
    hash: str
    signature: str | None


class S3Object(ResponseModel):
    bucket: str
    key: str


class CheckpointSummary(ResponseModel):
    """The newest checkpoint that covers the run, and whether the run still matches it."""

    status: Literal["verified", "mismatch"]
    checkpoint: int | None
    created_at: str | None
    root_hash: str | None
    tree_size: int | None
    seq: int | None
    kid: str | None
    object: S3Object | None
    count: int


class CheckpointUnavailable(ResponseModel):
    """The checkpoint store (S3) did not answer."""

    status: Literal["unavailable"]


class Signatures(ResponseModel):
    signed: int
    legacy: int


class ChainReport(ResponseModel):
    valid: bool
    head: str | None
    length: int
    broken_at_seq: int | None
    problems: list[str]
    signatures: Signatures
    outputs_checked: int
    checkpoint: CheckpointSummary | CheckpointUnavailable | None  # None: not checkpointed yet


class AuditTrail(ResponseModel):
    workflow_run_id: str
    logs: list[AuditEntry]
    chain: ChainReport


class PublicKey(ResponseModel):
    """An Ed25519 public key as a JWK (RFC 8037); `kid` is its RFC 7638 thumbprint."""

    kid: str
    kty: Literal["OKP"]
    crv: Literal["Ed25519"]
    x: str
    created_at: str | None
    retired_at: str | None


class PublicKeys(ResponseModel):
    keys: list[PublicKey]


class StoredOutput(ResponseModel):
    """A stored output (a stage's, or the run's when stageId is null) and the entry (`seq`)
    that recorded its hash."""

    stage_id: str | None
    seq: int
    output_hash: str | None
    output: Any


class CheckpointHead(SignedDocument):
    """A signed Merkle tree head (RFC 6962), hashed and signed as entries are."""

    format: str
    checkpoint: int
    tree_size: int
    root_hash: str
    previous_hash: str
    created_at: str
    kid: str
    hash: str
    signature: str


class CheckpointLeaf(ResponseModel):
    run_id: str
    seq: int
    hash: str


class CheckpointProof(ResponseModel):
    """A checkpoint that covers the run: its head, the run's leaf and the inclusion proof."""

    head: CheckpointHead
    leaf: CheckpointLeaf
    leaf_index: int
    proof: list[str]
    object: S3Object


class CheckpointNumber(ResponseModel):
    checkpoint: int


class Nothing(ResponseModel):
    """An empty object."""


class MissingCheckpoint(ResponseModel):
    """A checkpoint the index names but whose S3 copy holds no leaf for the run."""

    head: CheckpointNumber
    leaf: Nothing
    missing: Literal[True]


class AuditBundle(ResponseModel):
    """What `maof-verify` checks offline (docs/audit.md "Verifying a run's audit trail")."""

    format: str
    run: RunSummary
    entries: list[AuditEntry]
    keys: list[PublicKey]
    outputs: list[StoredOutput]
    checkpoints: list[CheckpointProof | MissingCheckpoint]


class LatestCheckpoint(ResponseModel):
    checkpoint: CheckpointHead
    object: S3Object
