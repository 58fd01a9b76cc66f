"""Signed Merkle checkpoints of the runs' final heads, written to S3 (Object Lock, compliance
mode, in AWS): once a run is in one, rewriting its trail, even with the signing key and
every hash recomputed, no longer matches the copy in S3, and neither does cutting its tail.

On a schedule (MAOF_AUDIT_CHECKPOINT_INTERVAL_SECONDS): the runs that have ended (completed,
failed, cancelled) and whose newest entry is in no checkpoint yet (a run that ended since
the last one, or that was retried, or that recorded an answer after its end) each give a
leaf {"runId", "seq", "hash"} of that newest entry; the leaves make an RFC 6962 Merkle tree
whose signed head (audit/verify.py: same hash and signature rule as entries) names its
predecessor's hash, so the checkpoints form a chain too. A run whose head went back
(behind, or no longer through, a head already checkpointed), or whose trail is unsigned
legacy entries logged since signing began, is refused, loudly.

In S3: `checkpoints/<number>-<hash>.json` holds the head and every leaf, and for each leaf
a small marker `checkpoints/runs/<run uuid>/<number>-<hash>.json` names it, so which
checkpoints cover a run is read from S3 (one LIST of the run's folder), not only from the
database's index of them (append-only too, but its owner can disable the triggers). The
S3 copy is the one verification trusts: proofs are computed from its leaves.

Object Lock locks versions, not keys, so each key is written once (a conditional PUT; the
bucket policy refuses any other PUT under `checkpoints/`) and read by version: a key with
a second version or a delete marker was written by someone else, and counts as tampering,
never as the checkpoint.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from chalicelib.audit import keys as audit_keys
from chalicelib.audit import verify as rules
from chalicelib.aws import aws_client
from chalicelib.config import get_settings
from chalicelib.core.api import run_ref
from chalicelib.core.encoding import dumps
from chalicelib.db import autocommit_connection, session_scope
from chalicelib.logs import logger

# Entries are stamped before their transaction commits: a run whose last entry is stamped
# up to this long before the previous checkpoint's cut-off is still looked at.
COMMIT_MARGIN = timedelta(minutes=5)
# One checkpointer at a time (pg_try_advisory_lock key: "maof-cp").
ADVISORY_LOCK = 0x6D616F662D6370
OBJECT_PREFIX = "checkpoints/"
# Under OBJECT_PREFIX, so the functions' rights on `checkpoints/*` cover the markers too.
RUN_PREFIX = f"{OBJECT_PREFIX}runs/"
_OBJECT_NAME = re.compile(r"(\d{10})-[0-9a-f]{16}\.json")
# S3 calls a checkpoint makes at once (a LIST and a marker per run): the client's pool
# holds 64 connections (chalicelib/aws.py).
S3_CONCURRENCY = 32
# How many checkpoint objects a process keeps once read (they never change). By count,
# so few: a full one (MAOF_AUDIT_CHECKPOINT_MAX_RUNS leaves, 10,000 by default) takes
# about 6 MB parsed, with its tree and positions, and 64 filled most of the API's 512 MB.
CACHED_OBJECTS = 8
# Whether this context's S3 reads are an API request's (read_in_request).
_in_request: ContextVar[bool] = ContextVar("checkpoint_reads_in_request", default=False)


@dataclass(frozen=True)
class Leaf:
    run_id: uuid.UUID
    seq: int
    head: str
    logged_at: datetime
    version: int = rules.ENTRY_VERSION  # the head entry's

    @property
    def ref(self) -> str:
        return run_ref(self.run_id)

    def view(self) -> dict[str, Any]:
        return {"runId": self.ref, "seq": self.seq, "hash": self.head}


@dataclass(frozen=True)
class Covering:
    """A checkpoint object said to hold a leaf of a run: by the run's marker in S3, or by
    the database's index (which also knows the leaf's position). `tampered`: why the
    marker's key in S3 holds more than the one version MAOF wrote."""

    number: int
    key: str
    leaf_index: int | None = None
    tampered: str | None = None


@dataclass(frozen=True)
class Checkpointed:
    """A head of a run that a checkpoint recorded."""

    number: int
    seq: int
    head: str


class CheckpointMissing(Exception):
    """S3 holds no object (or no leaf of the run) where a marker or the index says a
    checkpoint is, or more than the one version MAOF wrote: nothing MAOF does leaves
    that, so someone did."""


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


def refusal(
    leaf: Leaf, earlier: Iterable[Checkpointed], current: dict[int, str | None]
) -> str | None:
    """Why `leaf` must not be checkpointed, or None: a run's head only moves forward, and
    every head a checkpoint recorded stays in its chain. `current` is the run's entry
    hash at each earlier head's seq (None: no such entry any more)."""
    for before in earlier:
        if leaf.seq < before.seq:
            return (
                f"its head is entry #{leaf.seq}, behind entry #{before.seq} that checkpoint "
                f"{before.number} recorded (truncated)"
            )
        if current.get(before.seq) != before.head:
            return (
                f"entry #{before.seq} no longer has the hash checkpoint {before.number} "
                "recorded (rewritten)"
            )
    return None


def unsigned(leaf: Leaf, keys: rules.KeySet) -> str | None:
    """Why `leaf` must not be checkpointed as a legacy trail, or None. A legacy (version 1)
    entry only comes before signed ones, so a run whose head is one has no signed entry at
    all: genuine only from before signing began; since then, a rewrite without the key."""
    if leaf.version != rules.LEGACY_VERSION:
        return None
    logged_at = leaf.logged_at.astimezone(UTC).isoformat(timespec="microseconds")
    why = rules.logged_before_signing(keys, logged_at)
    return f"its head, entry #{leaf.seq}, is {why} (rewritten without the key)" if why else None


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
    SELECT r.id AS run_id, h.seq, h.entry_hash, h.logged_at, h.version
      FROM recent JOIN workflow_runs AS r ON r.id = recent.run_id
      CROSS JOIN LATERAL (
           SELECT seq, entry_hash, logged_at, version FROM execution_logs AS e
            WHERE e.run_id = r.id ORDER BY seq DESC LIMIT 1) AS h
     WHERE r.status IN ('completed', 'failed', 'cancelled')
       AND NOT EXISTS (SELECT 1 FROM audit_checkpoint_runs AS c
                        WHERE c.run_id = r.id AND c.seq = h.seq)
     ORDER BY h.logged_at, r.id
     LIMIT :limit
    """
)

# The heads the index says earlier checkpoints recorded for these runs.
_INDEXED_HEADS = text(
    "SELECT run_id, checkpoint, seq, head_hash FROM audit_checkpoint_runs "
    "WHERE run_id = ANY(CAST(:runs AS uuid[]))"
)

# The runs' entry hashes at the given (run, seq) pairs.
_ENTRY_HASHES = text(
    """
    SELECT e.run_id, e.seq, e.entry_hash
      FROM unnest(CAST(:runs AS uuid[]), CAST(:seqs AS int[])) AS p(run_id, seq)
      JOIN execution_logs AS e ON e.run_id = p.run_id AND e.seq = p.seq
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


def run_prefix(run_id: uuid.UUID) -> str:
    """The S3 folder of the run's markers, one per checkpoint that covers it."""
    return f"{RUN_PREFIX}{run_id}/"


def marker_key(run_id: uuid.UUID, checkpoint_key: str) -> str:
    return run_prefix(run_id) + checkpoint_key.removeprefix(OBJECT_PREFIX)


def _indexed_heads(session: Session, leaves: Sequence[Leaf]) -> dict[uuid.UUID, list[Checkpointed]]:
    """What the database's index says earlier checkpoints recorded for each run."""
    earlier: dict[uuid.UUID, list[Checkpointed]] = {leaf.run_id: [] for leaf in leaves}
    for row in session.execute(_INDEXED_HEADS, {"runs": list(earlier)}):
        earlier[row.run_id].append(Checkpointed(row.checkpoint, row.seq, row.head_hash))
    return earlier


def newest(coverings: Iterable[Covering]) -> list[Covering]:
    """The coverings of the highest checkpoint number (more than one key only when a
    checkpoint was written to S3 but not recorded, and the next took its number)."""
    found = list(coverings)
    top = max((covering.number for covering in found), default=None)
    return [covering for covering in found if covering.number == top]


def _add_s3_heads(earlier: dict[uuid.UUID, list[Checkpointed]]) -> dict[uuid.UUID, str]:
    """Add to `earlier` the head S3's copy of the run's newest checkpoint recorded (the
    index's owner could have dropped its rows; S3 keeps them); the runs whose S3 copy of it
    is missing, or whose markers were tampered with (why, by run). The newest is enough:
    its head was checkpointed only once it passed through every head before it, so a chain
    that passes through it passes through them; and the work per run stays one LIST and
    one object, however often the run was checkpointed."""
    broken: dict[uuid.UUID, str] = {}
    with ThreadPoolExecutor(S3_CONCURRENCY, thread_name_prefix="maof-cp") as pool:
        listed = list(pool.map(listed_checkpoints, earlier))
    reads: list[tuple[Covering, uuid.UUID]] = []
    for run_id, coverings in zip(earlier, listed, strict=True):
        for covering in coverings:
            if covering.tampered:
                broken[run_id] = f"checkpoint {covering.number}: {covering.tampered}"
        reads.extend((c, run_id) for c in newest(c for c in coverings if not c.tampered))
    # Object by object (a run's own stay in key order): each is read once a round, however
    # many runs it covers and however few objects the cache keeps (CACHED_OBJECTS).
    for covering, run_id in sorted(reads, key=lambda read: read[0].key):
        try:
            found = leaf_of(covering.key, run_ref(run_id))
        except CheckpointMissing as exc:
            broken[run_id] = f"checkpoint {covering.number}: {exc}"
            continue
        earlier[run_id].append(Checkpointed(covering.number, *found))
    return broken


def _screen(
    leaves: Sequence[Leaf], earlier: dict[uuid.UUID, list[Checkpointed]]
) -> tuple[list[Leaf], dict[str, str]]:
    """The leaves to checkpoint, and the refused runs (why, by run reference). `earlier`:
    the index's heads of the runs, to which S3's are added."""
    broken = _add_s3_heads(earlier)
    pairs = {(run_id, before.seq) for run_id, heads in earlier.items() for before in heads}
    current: dict[uuid.UUID, dict[int, str | None]] = {run_id: {} for run_id in earlier}
    if pairs:
        runs, seqs = zip(*pairs, strict=True)
        with session_scope() as session:
            rows = session.execute(_ENTRY_HASHES, {"runs": list(runs), "seqs": list(seqs)})
            for row in rows:
                current[row.run_id][row.seq] = row.entry_hash
    keys = rules.key_set(audit_keys.key_ring().public)
    accepted: list[Leaf] = []
    refused: dict[str, str] = {}
    for leaf in leaves:
        why = (
            broken.get(leaf.run_id)
            or unsigned(leaf, keys)
            or refusal(leaf, earlier[leaf.run_id], current[leaf.run_id])
        )
        if why is None:
            accepted.append(leaf)
            continue
        refused[leaf.ref] = why
        logger.error(
            "audit checkpoint refused a run: its trail no longer holds what an earlier "
            "checkpoint recorded, or is unsigned where it must be signed (tampering?)",
            extra={"runId": leaf.ref, "seq": leaf.seq, "reason": why},
        )
    return accepted, refused


@contextmanager
def _one_checkpointer() -> Iterator[bool]:
    """Whether this is the only checkpointer running (until the block ends): a session's
    advisory lock, held on a connection of its own outside any transaction, so it lasts
    across S3 calls that no transaction may (Postgres ends a session idle in one for
    MAOF_DB_IDLE_IN_TRANSACTION_SECONDS, and a backlog's S3 calls add up to more). It goes
    with the session if the process dies."""
    with autocommit_connection() as conn:
        lock = {"key": ADVISORY_LOCK}
        if not conn.execute(text("SELECT pg_try_advisory_lock(:key)"), lock).scalar():
            yield False
            return
        try:
            yield True
        finally:
            try:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), lock)
            except Exception:
                # Never back to the pool holding the lock: closing the session releases it.
                conn.invalidate()


def checkpoint_once(now: datetime | None = None) -> dict[str, Any]:
    """Write the next checkpoint if any run needs one; what was done. No transaction is
    open during an S3 call: the runs are read in one, the checkpoint recorded in another,
    after its S3 objects are written."""
    with _one_checkpointer() as alone:
        if not alone:
            return {"checkpoint": None, "reason": "another checkpointer is running"}
        return _checkpoint(now)


def _checkpoint(now: datetime | None) -> dict[str, Any]:
    settings = get_settings()
    with session_scope() as session:
        started = now or session.execute(text("SELECT now()")).scalar_one()
        last = session.execute(_LAST).first()
        since = last.covered_until - COMMIT_MARGIN if last else datetime(1970, 1, 1, tzinfo=UTC)
        limit = settings.audit_checkpoint_max_runs
        rows = session.execute(_CANDIDATES, {"since": since, "limit": limit}).all()
        candidates = [
            Leaf(row.run_id, row.seq, row.entry_hash, row.logged_at, row.version) for row in rows
        ]
        indexed = _indexed_heads(session, candidates) if candidates else {}
    if not candidates:
        return {"checkpoint": None, "runs": 0, "candidates": 0, "refused": {}}
    leaves, refused = _screen(candidates, indexed)
    if not leaves:
        return {"checkpoint": None, "runs": 0, "candidates": len(rows), "refused": refused}
    number = (last.checkpoint if last else 0) + 1
    previous = last.head_hash if last else rules.GENESIS
    created_at = started.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    views = [leaf.view() for leaf in leaves]
    head = signed_head(number, views, previous, created_at)
    key = object_key(number, head["hash"])
    # A full batch covers up to its newest candidate only; the next one goes on from there.
    covered_until = candidates[-1].logged_at if len(candidates) >= limit else started
    # The checkpoint first: no index row and no marker without it.
    put_object(key, {"head": head, "leaves": views})
    put_markers(key, head, leaves)
    # Under the lock `last` is still the newest; had the lock gone with its session, a
    # checkpoint another wrote meanwhile holds this number, and the insert is refused.
    with session_scope() as session:
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
    return {
        "checkpoint": number,
        "runs": len(leaves),
        "candidates": len(rows),
        "refused": refused,
        "objectKey": key,
    }


def checkpoint() -> dict[str, Any]:
    """The scheduled handler: checkpoints until no run waits (or a few rounds)."""
    written: list[Any] = []
    for _ in range(5):
        result = checkpoint_once()
        if result.get("checkpoint") is None:
            break
        written.append(result["checkpoint"])
        if result["candidates"] < get_settings().audit_checkpoint_max_runs:
            break
    return {"checkpoints": written}


# ------------------------------------------------------------------ S3, the copy of record


@contextmanager
def read_in_request() -> Iterator[None]:
    """Within it (a block, or a function it decorates), this context's S3 reads use the
    client that gives up within seconds (aws_client's `in_request`): an API request then
    answers S3's silence as "unavailable" well within API Gateway's 29 s, where the patient
    client (the checkpointer's, a scheduled function's) held it ~75 s, past the 504."""
    token = _in_request.set(True)
    try:
        yield
    finally:
        _in_request.reset(token)


def _s3_reader() -> Any:
    return aws_client("s3", in_request=_in_request.get())


def put_object(key: str, document: dict[str, Any]) -> None:
    """Write `key` once: S3 refuses the PUT (412 PreconditionFailed, raised as it is) when
    the key exists, so MAOF never adds a version at a checkpoint's or marker's key."""
    aws_client("s3").put_object(
        Bucket=get_settings().audit_bucket,
        Key=key,
        Body=json.dumps(document, separators=(",", ":")).encode("utf-8"),
        ContentType="application/json",
        IfNoneMatch="*",
    )


def put_markers(key: str, head: dict[str, Any], leaves: Sequence[Leaf]) -> None:
    """One marker per leaf, in the run's folder: `key` covers the run (Object Lock keeps it
    as long as the checkpoint; the leaf is there for people, verification reads `key`)."""

    def put(item: tuple[int, Leaf]) -> None:
        index, leaf = item
        document = {
            "checkpoint": head["checkpoint"],
            "object": key,
            "leafIndex": index,
            "leaf": leaf.view(),
        }
        put_object(marker_key(leaf.run_id, key), document)

    with ThreadPoolExecutor(S3_CONCURRENCY, thread_name_prefix="maof-cp") as pool:
        list(pool.map(put, enumerate(leaves)))


def _missing(exc: Exception) -> bool:
    """S3's answer for a key it does not hold (botocore is not imported here: aws.py owns it)."""
    error = (getattr(exc, "response", None) or {}).get("Error") or {}
    return str(error.get("Code")) in ("NoSuchKey", "NoSuchVersion", "404", "NotFound")


def tampering(key: str, versions: int, deleted: int, what: str = "object") -> str | None:
    """Why a key holding `versions` versions and `deleted` delete markers is not as MAOF
    wrote it (one version, never deleted: Object Lock keeps it), or None."""
    if versions <= 1 and not deleted:
        return None
    return (
        f"its S3 {what} {key} holds {versions} versions and {deleted} delete markers, "
        "not the one version written (tampering?)"
    )


def _written_version(key: str) -> str:
    """The VersionId of the one version of `key` that S3 holds (one LIST call)."""
    answer = _s3_reader().list_object_versions(Bucket=get_settings().audit_bucket, Prefix=key)
    versions = [v["VersionId"] for v in answer.get("Versions") or [] if v["Key"] == key]
    deleted = sum(1 for d in answer.get("DeleteMarkers") or [] if d["Key"] == key)
    why = tampering(key, len(versions), deleted)
    if why:
        raise CheckpointMissing(why)
    if not versions:
        raise CheckpointMissing(f"its S3 object {key} is missing")
    return str(versions[0])


@functools.lru_cache(maxsize=CACHED_OBJECTS)
def read_object(key: str) -> dict[str, Any]:
    """A checkpoint object as S3 holds it, read by its version, the only one (immutable:
    cached per process). CheckpointMissing when S3 has no such object, or more than that
    version; any other failure of S3's is raised as it is."""
    try:
        version = _written_version(key)
        body = _s3_reader().get_object(
            Bucket=get_settings().audit_bucket, Key=key, VersionId=version
        )["Body"]
    except Exception as exc:
        if _missing(exc):
            raise CheckpointMissing(f"its S3 object {key} is missing") from None
        raise
    loaded: dict[str, Any] = json.loads(body.read())
    return loaded


@functools.lru_cache(maxsize=CACHED_OBJECTS)
def _tree(key: str) -> tuple[bytes, ...]:
    return tuple(leaf_hashes(read_object(key)["leaves"]))


@functools.lru_cache(maxsize=CACHED_OBJECTS)
def _positions(key: str) -> dict[str, int]:
    """Each run's newest leaf in checkpoint object `key`."""
    return {str(leaf["runId"]): i for i, leaf in enumerate(read_object(key)["leaves"])}


def leaf_of(key: str, run_ref: str) -> tuple[int, str]:
    """(seq, hash) of the run's leaf in checkpoint object `key`."""
    index = _positions(key).get(run_ref)
    if index is None:
        raise CheckpointMissing(f"its S3 object {key} holds no leaf of the run")
    leaf = read_object(key)["leaves"][index]
    return int(leaf["seq"]), str(leaf["hash"])


def proof_for(key: str, run_ref: str, index: int | None = None) -> dict[str, Any] | None:
    """The run's newest leaf in checkpoint object `key`, with its inclusion proof, from the
    S3 copy; None if the object holds no leaf for the run."""
    document = read_object(key)
    leaves = document["leaves"]
    if index is None or not (0 <= index < len(leaves) and leaves[index]["runId"] == run_ref):
        index = _positions(key).get(run_ref)
        if index is None:
            return None
    tree = _tree(key)
    return {
        "head": document["head"],
        "leaf": leaves[index],
        "leafIndex": index,
        "proof": [node.hex() for node in rules.inclusion_proof(index, tree)],
        "object": {"bucket": get_settings().audit_bucket, "key": key},
    }


def listed_checkpoints(run_id: uuid.UUID) -> list[Covering]:
    """The checkpoints whose marker S3 holds in the run's folder (one LIST call per 1,000
    versions): every version is listed, so a delete marker does not hide a marker, and a
    marker's key with more than its one version is flagged `tampered`."""
    versions: dict[str, int] = {}
    deleted: dict[str, int] = {}
    pages = _s3_reader().get_paginator("list_object_versions")
    for page in pages.paginate(Bucket=get_settings().audit_bucket, Prefix=run_prefix(run_id)):
        for kind, counts in (("Versions", versions), ("DeleteMarkers", deleted)):
            for item in page.get(kind) or []:
                counts[str(item["Key"])] = counts.get(str(item["Key"]), 0) + 1
    found = []
    for key in sorted(versions.keys() | deleted.keys()):
        name = key.rsplit("/", 1)[-1]
        matched = _OBJECT_NAME.fullmatch(name)
        if matched is None:
            logger.warning("not a checkpoint marker", extra={"key": key})
            continue
        why = tampering(key, versions.get(key, 0), deleted.get(key, 0), "marker")
        found.append(Covering(int(matched.group(1)), OBJECT_PREFIX + name, tampered=why))
    return found


def indexed_checkpoints(session: Session, run_id: uuid.UUID) -> list[Covering]:
    """The checkpoints the database's index says cover the run."""
    rows = session.execute(
        text(
            "SELECT c.checkpoint, c.object_key, r.leaf_index FROM audit_checkpoint_runs AS r "
            "JOIN audit_checkpoints AS c ON c.checkpoint = r.checkpoint "
            "WHERE r.run_id = :run_id ORDER BY c.checkpoint"
        ),
        {"run_id": run_id},
    ).all()
    return [Covering(row.checkpoint, row.object_key, row.leaf_index) for row in rows]


@dataclass(frozen=True)
class RunCheckpoints:
    """The checkpoints that cover a run, oldest first, as the bundle carries them: a proof
    from S3, or (S3 lacks the object or the run's leaf) a `missing` placeholder, with why
    in `problems`; `count`: how many checkpoints cover the run, read or not."""

    proofs: list[dict[str, Any]]
    problems: list[str]
    count: int = 0


def run_checkpoints(
    run_id: uuid.UUID, coverings: Iterable[Covering], *, every: bool = True
) -> RunCheckpoints:
    """The proofs of the checkpoints that S3's markers and the index name (either is
    enough: each names a checkpoint the run must match): of every one (`every`, for the
    export: two S3 calls per checkpoint not yet cached), or of the newest only (GET …/audit:
    two calls however often the run was checkpointed; its head was checkpointed only once
    it passed through every earlier one). A marker found tampered with is a problem either
    way: the LIST that found the markers says so."""
    by_key: dict[str, Covering] = {}
    for covering in coverings:
        known = by_key.get(covering.key)
        kept = covering if known is None or known.leaf_index is None else known
        # The index knows the leaf's position; only a marker knows it was tampered with.
        tampered = covering.tampered or (known.tampered if known else None)
        by_key[covering.key] = replace(kept, tampered=tampered)
    read = set(by_key) if every else {c.key for c in newest(by_key.values())}
    proofs: list[dict[str, Any]] = []
    problems: list[str] = []
    for covering in sorted(by_key.values(), key=lambda c: (c.number, c.key)):
        if covering.key not in read and not covering.tampered:
            continue
        try:
            if covering.tampered:
                raise CheckpointMissing(covering.tampered)
            proof = proof_for(covering.key, run_ref(run_id), covering.leaf_index)
            if proof is None:
                raise CheckpointMissing(f"its S3 object {covering.key} holds no leaf of the run")
        except CheckpointMissing as exc:
            proofs.append({"head": {"checkpoint": covering.number}, "leaf": {}, "missing": True})
            problems.append(f"checkpoint {covering.number}: {exc}")
            continue
        except (ValueError, KeyError, TypeError) as exc:  # S3 holds something else there
            proofs.append({"head": {"checkpoint": covering.number}, "leaf": {}, "missing": True})
            problems.append(f"checkpoint {covering.number}: unreadable S3 object ({exc})")
            continue
        proofs.append(proof)
    return RunCheckpoints(proofs, problems, len(by_key))


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
    _positions.cache_clear()
