"""Append entries to a run's hash chain and verify it.

entryHash = sha256(prevHash + canonical(entry)); the first entry of a run chains
from GENESIS. The table is append-only (a trigger refuses UPDATE and DELETE), and
any row altered behind the trigger's back makes verification fail.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from chalicelib.db.models import AuditEntry

GENESIS = "0" * 64
_ABSENT: Any = object()


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the bytes every hash is taken over."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )


def sha256_json(value: Any) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()


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
    return hashlib.sha256(prev_hash.encode("ascii") + canonical_json(document)).hexdigest()


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
    """The entry that follows the chain's head (last_seq, last_hash), hashed; None for
    both when the run has no entry yet."""
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
        details=details,
        logged_at=datetime.now(UTC),
        prev_hash=prev_hash,
        entry_hash="",
    )
    entry.entry_hash = entry_hash(prev_hash, entry_document(entry))
    return entry


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
        input_hash=None if input is _ABSENT else sha256_json(input),
        output_hash=None if output is _ABSENT else sha256_json(output),
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

    def view(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "head": self.head,
            "length": self.length,
            "brokenAtSeq": self.broken_at,
        }


def verify(entries: Sequence[AuditEntry]) -> ChainStatus:
    """Check links, order and every hash of a run's entries (sorted by seq)."""
    prev = GENESIS
    for expected_seq, entry in enumerate(entries, start=1):
        recomputed = entry_hash(prev, entry_document(entry))
        if entry.seq != expected_seq or entry.prev_hash != prev or entry.entry_hash != recomputed:
            # The position where the chain stops holding, not the (maybe forged) seq there.
            return ChainStatus(False, entries[-1].entry_hash, len(entries), expected_seq)
        prev = entry.entry_hash
    return ChainStatus(True, prev if entries else None, len(entries))


def entry_view(entry: AuditEntry) -> dict[str, Any]:
    """An entry as the API shows it: the hashed document plus its links."""
    document = entry_document(entry)
    del document["runId"]
    return {**document, "prevHash": entry.prev_hash, "entryHash": entry.entry_hash}
