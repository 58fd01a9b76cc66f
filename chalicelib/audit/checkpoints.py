"""Signed Merkle checkpoints of the runs' final heads, written to S3 (Object Lock, compliance
mode, in AWS): once a run is in one, rewriting its trail, even with the signing key and
every hash recomputed, no longer matches the copy in S3.

On a schedule (MAOF_AUDIT_CHECKPOINT_INTERVAL_SECONDS): the runs that have ended (completed,
failed, cancelled) and whose newest entry is in no checkpoint yet (a run that ended since
the last one, or that was retried, or that recorded an answer after its end) each give a
leaf {"runId", "seq", "hash"} of that newest entry; the leaves make an RFC 6962 Merkle tree
whose signed head (audit/verify.py: same hash and signature rule as entries) names its
predecessor's hash, so the checkpoints form a chain too. The S3 object
`checkpoints/<number>-<hash>.json` holds the head and every leaf; the database keeps an
index of which runs each checkpoint covers (append-only as well). The S3 copy is the one
verification trusts: proofs are computed from its leaves.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text

from chalicelib.audit import keys as audit_keys
from chalicelib.audit import verify as rules
from chalicelib.aws import aws_client
from chalicelib.config import get_settings
from chalicelib.core.api import run_ref
from chalicelib.core.encoding import dumps
from chalicelib.db import session_scope
from chalicelib.logs import logger

# Entries are stamped before their transaction commits: a run whose last entry is stamped
# up to this long before the previous checkpoint's cut-off is still looked at.
COMMIT_MARGIN = timedelta(minutes=5)
# One checkpointer at a time (pg_try_advisory_xact_lock key: "maof-cp").
ADVISORY_LOCK = 0x6D616F662D6370
OBJECT_PREFIX = "checkpoints/"


@dataclass(frozen=True)
class Leaf:
    run_id: uuid.UUID
    seq: int
    head: str
    logged_at: datetime

    @property
    def ref(self) -> str:
        return run_ref(self.run_id)

    def view(self) -> dict[str, Any]:
        return {"runId": self.ref, "seq": self.seq, "hash": self.head}


def leaf_hashes(leaves: Sequence[dict[str, Any]]) -> list[bytes]:
    return [
        rules.leaf_hash(rules.leaf_bytes(str(leaf["runId"]), int(leaf["seq"]), str(leaf["hash"])))
        for leaf in leaves
    ]


def signed_head(
    number: int, leaves: Sequence[dict[str, Any]], previous: str, created_at: str
) -> dict[str, Any]:
    """The checkpoint's tree head, hashed and signed by the current key."""
    signer = audit_keys.key_ring().signer
    head: dict[str, Any] = {
        "format": rules.CHECKPOINT_FORMAT,
        "checkpoint": number,
        "treeSize": len(leaves),
        "rootHash": rules.merkle_root(leaf_hashes(leaves)).hex(),
        "previousHash": previous,
        "createdAt": created_at,
        "kid": signer.kid,
    }
    head["hash"] = rules.object_hash(head)
    head["signature"] = signer.sign(head["hash"])
    return head


_LAST = text(
    "SELECT checkpoint, head_hash, covered_until FROM audit_checkpoints "
    "ORDER BY checkpoint DESC LIMIT 1"
)

# Ended runs with an entry stamped since :since whose newest entry no checkpoint holds.
_CANDIDATES = text(
    """
    WITH recent AS (
        SELECT DISTINCT run_id FROM execution_logs WHERE logged_at >= :since
    )
    SELECT r.id AS run_id, h.seq, h.entry_hash, h.logged_at
      FROM recent JOIN workflow_runs AS r ON r.id = recent.run_id
      CROSS JOIN LATERAL (
           SELECT seq, entry_hash, logged_at FROM execution_logs AS e
            WHERE e.run_id = r.id ORDER BY seq DESC LIMIT 1) AS h
     WHERE r.status IN ('completed', 'failed', 'cancelled')
       AND NOT EXISTS (SELECT 1 FROM audit_checkpoint_runs AS c
                        WHERE c.run_id = r.id AND c.seq = h.seq)
     ORDER BY h.logged_at, r.id
     LIMIT :limit
    """
)

_RECORD = text(
    """
    WITH cp AS (
        INSERT INTO audit_checkpoints (checkpoint, tree_size, root_hash, head_hash, head,
                                       object_key, covered_until)
        VALUES (:checkpoint, :tree_size, :root_hash, :head_hash, CAST(:head AS jsonb),
                :object_key, :covered_until)
        RETURNING checkpoint
    )
    INSERT INTO audit_checkpoint_runs (checkpoint, leaf_index, run_id, seq, head_hash)
    SELECT cp.checkpoint, l.leaf_index, l.run_id, l.seq, l.head_hash
      FROM cp, jsonb_to_recordset(CAST(:leaves AS jsonb))
           AS l(leaf_index int, run_id uuid, seq int, head_hash text)
    """
)


def object_key(number: int, head_hash: str) -> str:
    return f"{OBJECT_PREFIX}{number:010d}-{head_hash[:16]}.json"


def checkpoint_once(now: datetime | None = None) -> dict[str, Any]:
    """Write the next checkpoint if any run needs one; what was done."""
    settings = get_settings()
    with session_scope() as session:
        if not session.execute(
            text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK}
        ).scalar():
            return {"checkpoint": None, "reason": "another checkpointer is running"}
        started = now or session.execute(text("SELECT now()")).scalar_one()
        last = session.execute(_LAST).first()
        since = last.covered_until - COMMIT_MARGIN if last else datetime(1970, 1, 1, tzinfo=UTC)
        limit = settings.audit_checkpoint_max_runs
        rows = session.execute(_CANDIDATES, {"since": since, "limit": limit}).all()
        if not rows:
            return {"checkpoint": None, "runs": 0}
        leaves = [Leaf(row.run_id, row.seq, row.entry_hash, row.logged_at) for row in rows]
        number = (last.checkpoint if last else 0) + 1
        previous = last.head_hash if last else rules.GENESIS
        created_at = started.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        views = [leaf.view() for leaf in leaves]
        head = signed_head(number, views, previous, created_at)
        key = object_key(number, head["hash"])
        # A full batch covers up to its newest leaf only; the next one goes on from there.
        covered_until = leaves[-1].logged_at if len(leaves) >= limit else started
        document = {"head": head, "leaves": views}
        put_object(key, document)  # before the commit: no index row without its S3 copy
        session.execute(
            _RECORD,
            {
                "checkpoint": number,
                "tree_size": len(leaves),
                "root_hash": head["rootHash"],
                "head_hash": head["hash"],
                "head": dumps(head),
                "object_key": key,
                "covered_until": covered_until,
                "leaves": dumps(
                    [
                        {
                            "leaf_index": index,
                            "run_id": str(leaf.run_id),
                            "seq": leaf.seq,
                            "head_hash": leaf.head,
                        }
                        for index, leaf in enumerate(leaves)
                    ]
                ),
            },
        )
    logger.info("audit checkpoint written", extra={"checkpoint": number, "runs": len(leaves)})
    return {"checkpoint": number, "runs": len(leaves), "objectKey": key}


def checkpoint() -> dict[str, Any]:
    """The scheduled handler: checkpoints until no run waits (or a few rounds)."""
    written: list[Any] = []
    for _ in range(5):
        result = checkpoint_once()
        if result.get("checkpoint") is None:
            break
        written.append(result["checkpoint"])
        if result["runs"] < get_settings().audit_checkpoint_max_runs:
            break
    return {"checkpoints": written}


# ------------------------------------------------------------------ S3, the copy of record


def put_object(key: str, document: dict[str, Any]) -> None:
    aws_client("s3").put_object(
        Bucket=get_settings().audit_bucket,
        Key=key,
        Body=json.dumps(document, separators=(",", ":")).encode("utf-8"),
        ContentType="application/json",
    )


@functools.lru_cache(maxsize=64)
def read_object(key: str) -> dict[str, Any]:
    """A checkpoint object as S3 holds it (immutable: cached per process)."""
    body = aws_client("s3").get_object(Bucket=get_settings().audit_bucket, Key=key)["Body"]
    loaded: dict[str, Any] = json.loads(body.read())
    return loaded


@functools.lru_cache(maxsize=64)
def _tree(key: str) -> tuple[bytes, ...]:
    return tuple(leaf_hashes(read_object(key)["leaves"]))


def proof_for(key: str, run_ref: str, index: int | None = None) -> dict[str, Any] | None:
    """The run's newest leaf in checkpoint object `key`, with its inclusion proof, from the
    S3 copy; None if the object holds no leaf for the run."""
    document = read_object(key)
    leaves = document["leaves"]
    if index is None or not (0 <= index < len(leaves) and leaves[index]["runId"] == run_ref):
        matching = [i for i, leaf in enumerate(leaves) if leaf["runId"] == run_ref]
        if not matching:
            return None
        index = matching[-1]
    tree = _tree(key)
    return {
        "head": document["head"],
        "leaf": leaves[index],
        "leafIndex": index,
        "proof": [node.hex() for node in rules.inclusion_proof(index, tree)],
        "object": {"bucket": get_settings().audit_bucket, "key": key},
    }


def run_checkpoints(session: Any, run_id: uuid.UUID) -> list[dict[str, Any]]:
    """Every checkpoint that covers the run, oldest first, with proofs from S3."""
    rows = session.execute(
        text(
            "SELECT c.checkpoint, c.object_key, r.leaf_index FROM audit_checkpoint_runs AS r "
            "JOIN audit_checkpoints AS c ON c.checkpoint = r.checkpoint "
            "WHERE r.run_id = :run_id ORDER BY c.checkpoint"
        ),
        {"run_id": run_id},
    ).all()
    found = []
    for row in rows:
        proof = proof_for(row.object_key, run_ref(run_id), row.leaf_index)
        if proof is None:
            proof = {"head": {"checkpoint": row.checkpoint}, "leaf": {}, "missing": True}
        found.append(proof)
    return found


def latest() -> dict[str, Any] | None:
    """The newest signed head, from its S3 copy, and where that copy is."""
    with session_scope() as session:
        row = session.execute(
            text("SELECT object_key FROM audit_checkpoints ORDER BY checkpoint DESC LIMIT 1")
        ).first()
    if row is None:
        return None
    document = read_object(row.object_key)
    return {
        "checkpoint": document["head"],
        "object": {"bucket": get_settings().audit_bucket, "key": row.object_key},
    }


def reset() -> None:
    read_object.cache_clear()
    _tree.cache_clear()
