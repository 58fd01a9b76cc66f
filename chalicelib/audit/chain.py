"""Append entries to a run's hash chain, signed, and verify it (with audit/verify.py, the
code `maof-verify` runs offline).

An entry is the object GET /workflows/{runId}/audit serves: its `hash` is the SHA-256 of the
RFC 8785 canonical JSON of every other member but `signature`, `prevHash` links it to the
entry before (GENESIS for the first), and `signature` is Ed25519 over the hash by the key
`kid` (audit/keys.py). The table is append-only (a trigger refuses UPDATE, DELETE and
TRUNCATE, and the application's database role holds only INSERT and SELECT on it); a row
altered by the owner, even with every hash recomputed and re-signed, is caught by the signed
checkpoint in S3 that recorded the run's head (audit/checkpoints.py).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from chalicelib.audit import keys as audit_keys
from chalicelib.audit import verify as rules
from chalicelib.core.api import run_ref
from chalicelib.core.encoding import json_default
from chalicelib.db.models import AuditEntry

GENESIS = rules.GENESIS
_ABSENT: Any = object()


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the version 1 entries' canonical form (still used
    for digests outside the audit trail: idempotency keys, the mock agent)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )


def sha256_json(value: Any) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()


def value_hash(value: Any) -> str:
    """inputHash / outputHash of an entry: SHA-256 of the RFC 8785 canonical JSON."""
    return rules.value_hash(value)


def _timestamp(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def entry_document(entry: AuditEntry) -> dict[str, Any]:
    """The fields of an entry covered by its hash."""
    return {
        "runId": str(entry.run_id),
        "seq": entry.seq,
        "stageId": entry.stage_id,
        "agentId": entry.agent_id,
        "action": entry.action,
        "status": entry.status,
        "inputHash": entry.input_hash,
        "outputHash": entry.output_hash,
        "details": entry.details,
        "loggedAt": _timestamp(entry.logged_at),
    }


def entry_hash(prev_hash: str, document: dict[str, Any]) -> str:
    """A version 1 entry's hash (entries written before signing)."""
    return hashlib.sha256(prev_hash.encode("ascii") + canonical_json(document)).hexdigest()


def entry_view(entry: AuditEntry) -> dict[str, Any]:
    """An entry exactly as the API serves it (and, for version 2, as it is hashed)."""
    document = entry_document(entry)
    return {
        "version": entry.version or rules.LEGACY_VERSION,
        "runId": run_ref(entry.run_id),
        **{k: v for k, v in document.items() if k != "runId"},
        "prevHash": entry.prev_hash,
        "kid": entry.kid,
        "hash": entry.entry_hash,
        "signature": entry.signature,
    }


def seal(entry: AuditEntry) -> AuditEntry:
    """Give a version 2 entry its kid, hash and signature (~50 µs: no round trip)."""
    signer = audit_keys.key_ring().signer
    entry.version = rules.ENTRY_VERSION
    entry.kid = signer.kid
    entry.entry_hash = rules.object_hash(entry_view(entry))
    entry.signature = signer.sign(entry.entry_hash)
    return entry


def next_entry(
    run_id: uuid.UUID,
    last_seq: int | None,
    last_hash: str | None,
    action: str,
    status: str,
    *,
    stage_id: str | None = None,
    agent_id: str | None = None,
    input_hash: str | None = None,
    output_hash: str | None = None,
    details: dict[str, Any] | None = None,
) -> AuditEntry:
    """The entry that follows the chain's head (last_seq, last_hash), hashed and signed;
    None for both when the run has no entry yet."""
    seq, prev_hash = (last_seq + 1, last_hash) if last_seq is not None else (1, GENESIS)
    assert prev_hash is not None
    entry = AuditEntry(
        run_id=run_id,
        seq=seq,
        stage_id=stage_id,
        agent_id=agent_id,
        action=action,
        status=status,
        input_hash=input_hash,
        output_hash=output_hash,
        # Stored as jsonb and served back: what is hashed must be what comes back.
        details=json.loads(json.dumps(details, default=json_default))
        if details is not None
        else None,
        logged_at=datetime.now(UTC),
        prev_hash=prev_hash,
        entry_hash="",
    )
    return seal(entry)


def append(
    session: Session,
    run_id: uuid.UUID,
    action: str,
    status: str,
    *,
    stage_id: str | None = None,
    agent_id: str | None = None,
    input: Any = _ABSENT,
    output: Any = _ABSENT,
    details: dict[str, Any] | None = None,
) -> AuditEntry:
    """Add the next entry of `run_id`'s chain.

    The caller holds the run's row lock (SELECT ... FOR UPDATE on workflow_runs),
    so entries of one run are appended one at a time and the chain never forks.
    """
    last = session.execute(
        select(AuditEntry.seq, AuditEntry.entry_hash)
        .where(AuditEntry.run_id == run_id)
        .order_by(AuditEntry.seq.desc())
        .limit(1)
    ).first()
    entry = next_entry(
        run_id,
        last.seq if last else None,
        last.entry_hash if last else None,
        action,
        status,
        stage_id=stage_id,
        agent_id=agent_id,
        input_hash=None if input is _ABSENT else value_hash(input),
        output_hash=None if output is _ABSENT else value_hash(output),
        details=details,
    )
    session.add(entry)
    return entry


@dataclass(frozen=True)
class ChainStatus:
    valid: bool
    head: str | None
    length: int
    broken_at: int | None = None
    reasons: list[str] = field(default_factory=list)
    signed: int = 0
    legacy: int = 0
    outputs_checked: int = 0
    checkpoint: dict[str, Any] | None = None

    def view(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "head": self.head,
            "length": self.length,
            "brokenAtSeq": self.broken_at,
            "problems": self.reasons,
            "signatures": {"signed": self.signed, "legacy": self.legacy},
            "outputsChecked": self.outputs_checked,
            "checkpoint": self.checkpoint,
        }


def status_of(report: rules.Report, checkpoint: dict[str, Any] | None = None) -> ChainStatus:
    return ChainStatus(
        valid=report.valid,
        head=report.head,
        length=report.length,
        broken_at=report.broken_at,
        reasons=[str(problem) for problem in report.problems],
        signed=report.signed,
        legacy=report.legacy,
        outputs_checked=report.outputs_checked,
        checkpoint=checkpoint,
    )


def verify(bundle: Mapping[str, Any]) -> ChainStatus:
    """Every check `maof-verify` makes on an export bundle (rules.verify_bundle), with this
    service's public keys: links, order, hashes and signatures of the entries, the stored
    outputs against their hashes and that none is missing, the run summary against the
    entries, and the checkpoints. Legacy entries are taken as `--allow-legacy` takes them."""
    report = rules.verify_bundle(bundle, audit_keys.key_ring().public, allow_legacy=True)
    return status_of(report)
