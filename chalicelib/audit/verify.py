"""Verify a run's audit trail offline: hashes, links, Ed25519 signatures, stored outputs and
inclusion in signed Merkle checkpoints (`maof-verify BUNDLE.json [--key KEYS.json]`).

Standalone on purpose: only the standard library, `rfc8785` and `cryptography`, no MAOF
settings or database, so the API (chain.py) and anyone holding a bundle and the public keys
run the very same checks. docs/audit.md "Verifying a run's audit trail" states each rule.

The rules (version 2 entries):
- hash      = lowercase hex SHA-256 of the RFC 8785 (JCS) canonical JSON of the entry
              object without its `hash` and `signature` members;
- prevHash  = the previous entry's `hash`; 64 zeros for the first entry (seq 1);
- signature = Ed25519 over the ASCII bytes of `hash`, base64url without padding (only the
              one canonical spelling of the bytes decodes), by the key named `kid` (a JWK
              of /audit/keys, whose `kid` must be its RFC 7638 thumbprint); a retired key's
              signature counts only on what is stamped (`loggedAt`, a checkpoint's
              `createdAt`) at most RETIREMENT_GRACE after its `retiredAt`;
- numbers are IEEE-754 doubles, as JSON.parse reads them: an integer beyond ±(2^53-1) is
  canonicalised as the double nearest it;
- outputHash (and inputHash) = hex SHA-256 of the JCS of the value;
- a checkpoint leaf is the JCS of {"runId", "seq", "hash"} (a run's head when it was
  checkpointed); leaf hash = SHA-256(0x00 || leaf), node = SHA-256(0x01 || left || right)
  (RFC 6962 §2.1), and the checkpoint's signed head carries the root (`rootHash`) and is
  hashed and signed by the entry rule.
Entries written before signing existed (`version` 1) chain as sha256(prevHash + sorted-key
JSON of the old document), their outputHash is the SHA-256 of the same sorted-key JSON of
the output (legacy_value_hash); they carry no signature and are reported as legacy: the API
accepts them before signed ones, a bundle only with `allow_legacy` (`--allow-legacy`), and
either only if logged before signing began (the keys' earliest `createdAt`, plus an hour).
A bundle must also carry every output its entries record, and its `run` summary must agree
with them (workflowName, status, errorMessage null unless the run failed or was cancelled).
A malformed bundle is a problem in the report, never an exception.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeGuard

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

GENESIS = "0" * 64
ENTRY_VERSION = 2
LEGACY_VERSION = 1
BUNDLE_FORMAT = "maof-audit-bundle/1"
CHECKPOINT_FORMAT = "maof-audit-checkpoint/1"
UNSIGNED = ("hash", "signature")  # the members an entry's hash does not cover
_SAFE_INTEGER = 2**53 - 1
# A retired key still counts on what is stamped up to this long after its retiredAt:
# containers that read the key set before a rotation sign with the old key until `make
# rotate-key` has recycled them, and a stage worker's invocation may run for 15 minutes.
RETIREMENT_GRACE = timedelta(hours=1)
# Signing began when the first key was made (the earliest `createdAt` of the key set, kept
# outside the database); functions of the release before it, still running through the
# deploy that brought signing, write unsigned entries for up to this long after.
SIGNING_GRACE = timedelta(hours=1)
# What reading malformed input raises (a string where an object belongs, an integer no
# double holds, Infinity, nesting too deep): reported as a problem, never a traceback.
MALFORMED = (ValueError, OverflowError, TypeError, AttributeError, KeyError, RecursionError)


# ------------------------------------------------------------------ canonical JSON, hashes


def _as_doubles(value: Any) -> Any:
    """Integers beyond JSON's safe range become the doubles JSON.parse would read."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if -_SAFE_INTEGER <= value <= _SAFE_INTEGER else float(value)
    if isinstance(value, dict):
        return {key: _as_doubles(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_as_doubles(item) for item in value]
    return value


def jcs(value: Any) -> bytes:
    """The RFC 8785 canonical JSON of `value` (UTF-8 bytes)."""
    return rfc8785.dumps(_as_doubles(value))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def value_hash(value: Any) -> str:
    """inputHash / outputHash: SHA-256 of the value's canonical JSON."""
    return sha256_hex(jcs(value))


def legacy_value_hash(value: Any) -> str:
    """A version 1 entry's inputHash / outputHash: SHA-256 of the sorted-key, compact, UTF-8
    JSON of the value as Python's json.dumps wrote it (1.0 stays `1.0`; JCS writes `1`)."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return sha256_hex(canonical.encode("utf-8"))


def object_hash(document: Mapping[str, Any]) -> str:
    """The `hash` of a signed object (an entry, a checkpoint head): SHA-256 of the JCS of
    every member but `hash` and `signature`."""
    return sha256_hex(jcs({k: v for k, v in document.items() if k not in UNSIGNED}))


def legacy_entry_hash(entry: Mapping[str, Any]) -> str:
    """A version 1 entry's hash: sha256(prevHash + sorted-key, compact, UTF-8 JSON of the
    old document, which named the run by its bare uuid)."""
    run_id = str(entry.get("runId", ""))
    document = {
        "runId": run_id.removeprefix("wfr-"),
        "seq": entry.get("seq"),
        "stageId": entry.get("stageId"),
        "agentId": entry.get("agentId"),
        "action": entry.get("action"),
        "status": entry.get("status"),
        "inputHash": entry.get("inputHash"),
        "outputHash": entry.get("outputHash"),
        "details": entry.get("details"),
        "loggedAt": entry.get("loggedAt"),
    }
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    prev = str(entry.get("prevHash", ""))
    return sha256_hex(prev.encode("ascii", "replace") + canonical.encode("utf-8"))


# ------------------------------------------------------------------ keys and signatures


_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")


def b64url_decode(text: str) -> bytes:
    """base64url without padding, strictly: padding, any other character or spare bits set
    is a ValueError, so a signature or a key has exactly one text that decodes."""
    if not isinstance(text, str) or not _BASE64URL.fullmatch(text):
        raise ValueError("not base64url without padding")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url_encode(data) != text:
        raise ValueError("not the canonical base64url of its bytes")
    return data


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def thumbprint(x: str) -> str:
    """RFC 7638 thumbprint of an Ed25519 public key (members crv, kty, x in order): a key's
    `kid` (audit/keys.py names keys so; repeated here to keep this module standalone)."""
    canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":"))
    return b64url_encode(hashlib.sha256(canonical.encode("ascii")).digest())


def timestamp(value: Any) -> datetime | None:
    """An ISO 8601 date-time with a time zone (`loggedAt`, `createdAt`, `retiredAt`), or
    None if `value` is not one."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def public_key_of(jwk: Mapping[str, Any]) -> Ed25519PublicKey:
    if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
        raise ValueError(f"key {jwk.get('kid')!r} is not an Ed25519 OKP key")
    if not isinstance(jwk.get("x"), str):
        raise ValueError(f"key {jwk.get('kid')!r} has no `x`")
    return Ed25519PublicKey.from_public_bytes(b64url_decode(jwk["x"]))


class KeySet(dict[str, Ed25519PublicKey]):
    """kid -> public key, when each retired key was retired (`retired`, by kid), and when
    signing began (`began`: the earliest `createdAt`; None if no key gives one)."""

    def __init__(self) -> None:
        super().__init__()
        self.retired: dict[str, datetime] = {}
        self.began: datetime | None = None


def key_set(keys: Iterable[Mapping[str, Any]]) -> KeySet:
    """kid -> public key, from JWKs (as GET /audit/keys lists them). A key whose `kid` is
    not its RFC 7638 thumbprint is a ValueError: a kid names one key, so a bundle cannot
    slip another key in under a real kid."""
    found = KeySet()
    for jwk in keys:
        if not isinstance(jwk, Mapping):
            raise ValueError("a key is not a JSON object")
        public = public_key_of(jwk)
        kid = jwk.get("kid")
        if not isinstance(kid, str) or kid != thumbprint(jwk["x"]):
            raise ValueError(f"key {kid!r}: its kid is not its RFC 7638 thumbprint")
        if jwk.get("retiredAt") not in (None, ""):  # as audit/keys.py reads it
            retired = timestamp(jwk["retiredAt"])
            if retired is None:
                raise ValueError(f"key {kid}: retiredAt {jwk['retiredAt']!r} is not a date-time")
            found.retired[kid] = retired
        created = timestamp(jwk.get("createdAt"))
        if created is not None and (found.began is None or created < found.began):
            found.began = created
        found[kid] = public
    return found


def signature_valid(keys: Mapping[str, Ed25519PublicKey], kid: Any, digest: str, sig: Any) -> str:
    """'' when `sig` is kid's Ed25519 signature of the ASCII bytes of `digest`, else why not."""
    if not isinstance(kid, str) or kid not in keys:
        return f"unknown key id {kid!r}"
    if not isinstance(sig, str) or not sig:
        return "no signature"
    try:
        raw = b64url_decode(sig)
    except ValueError:
        return "the signature is not base64url without padding"
    try:
        keys[kid].verify(raw, digest.encode("ascii"))
    except (InvalidSignature, ValueError):
        return f"signature does not verify with key {kid}"
    return ""


def signed_while_current(
    keys: Mapping[str, Ed25519PublicKey], kid: Any, stamped: Any, member: str
) -> str:
    """'' unless kid's key (of a KeySet) had been retired for over RETIREMENT_GRACE at
    `stamped`, the time the signed object gives itself in `member`; else why. Whoever holds
    a retired private key can still backdate: checkpoints are what pin history."""
    retired = keys.retired.get(kid) if isinstance(keys, KeySet) else None
    if retired is None:
        return ""
    when = timestamp(stamped)
    if when is None:
        return f"key {kid} is retired, and {member} {stamped!r} is not a date-time"
    if when > retired + RETIREMENT_GRACE:
        return (
            f"{member} {stamped} is after key {kid} was retired "
            f"({retired.isoformat()}): a retired key signs nothing new"
        )
    return ""


def logged_before_signing(keys: Mapping[str, Ed25519PublicKey], logged_at: Any) -> str:
    """'' when a legacy (version 1, unsigned) entry stamped `logged_at` predates signing
    (a KeySet's `began`, plus SIGNING_GRACE); else why not. Since then every entry is
    signed: one unsigned is a rewrite by someone without the key (backdating `loggedAt`
    too is not caught here: its run then shows dates from before signing)."""
    began = keys.began if isinstance(keys, KeySet) else None
    if began is None:
        return "a legacy (version 1) entry, and no key says when signing began (createdAt)"
    when = timestamp(logged_at)
    if when is None:
        return f"a legacy (version 1) entry whose loggedAt {logged_at!r} is not a date-time"
    if when > began + SIGNING_GRACE:
        return (
            f"a legacy (version 1) entry logged at {logged_at}, after signing began "
            f"({began.isoformat()}): every entry since is signed"
        )
    return ""


# ------------------------------------------------------------------ Merkle trees (RFC 6962)


def leaf_bytes(run_id: str, seq: int, head: str) -> bytes:
    return jcs({"runId": run_id, "seq": seq, "hash": head})


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    k = 1
    while k << 1 < n:
        k <<= 1
    return k


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """MTH of the leaf hashes (RFC 6962 §2.1); the empty tree's is SHA-256 of nothing."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = _split(len(leaves))
    return node_hash(merkle_root(leaves[:k]), merkle_root(leaves[k:]))


def inclusion_proof(index: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PATH(index, D[n]) of RFC 6962 §2.1.1: the sibling hashes from the leaf up."""
    if len(leaves) <= 1:
        return []
    k = _split(len(leaves))
    if index < k:
        return [*inclusion_proof(index, leaves[:k]), merkle_root(leaves[k:])]
    return [*inclusion_proof(index - k, leaves[k:]), merkle_root(leaves[:k])]


def root_from_proof(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes | None:
    """The root that `proof` leads to from leaf hash `leaf` at `index` of a tree of `size`
    leaves (RFC 9162 §2.1.3.2), or None if the proof has the wrong shape."""
    if not 0 <= index < size:
        return None
    fn, sn, r = index, size - 1, leaf
    for sibling in proof:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = node_hash(sibling, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, sibling)
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None


# ------------------------------------------------------------------ reports


@dataclass(frozen=True)
class Problem:
    seq: int | None  # the entry at fault, when one is
    reason: str

    def view(self) -> dict[str, Any]:
        return {"seq": self.seq, "reason": self.reason}

    def __str__(self) -> str:
        return f"entry #{self.seq}: {self.reason}" if self.seq is not None else self.reason


@dataclass
class Report:
    length: int = 0
    head: str | None = None
    signed: int = 0
    legacy: int = 0
    outputs_checked: int = 0
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.problems

    @property
    def broken_at(self) -> int | None:
        seqs = [p.seq for p in self.problems if p.seq is not None]
        return min(seqs) if seqs else None


# ------------------------------------------------------------------ the checks


def _is_count(value: Any) -> TypeGuard[int]:
    """A JSON integer (not a boolean) of at least 1: a seq, a tree size."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _hash_problem(entry: Mapping[str, Any], rule: Any, which: str = "") -> tuple[str, str]:
    """(the entry's hash by `rule`, '') if its `hash` is that, else ('', why)."""
    try:
        digest = str(rule(entry))
    except MALFORMED as exc:
        return "", f"its contents have no canonical JSON ({exc})"
    if entry.get("hash") != digest:
        return "", f"hash does not match the entry's contents{which}"
    return digest, ""


def _signed_entry_problem(entry: Mapping[str, Any], keys: Mapping[str, Ed25519PublicKey]) -> str:
    digest, problem = _hash_problem(entry, object_hash)
    if problem:
        return problem
    kid = entry.get("kid")
    return signature_valid(keys, kid, digest, entry.get("signature")) or signed_while_current(
        keys, kid, entry.get("loggedAt"), "loggedAt"
    )


def _legacy_entry_problem(entry: Mapping[str, Any], keys: Mapping[str, Ed25519PublicKey]) -> str:
    _, problem = _hash_problem(entry, legacy_entry_hash, " (version 1 rule)")
    return problem or logged_before_signing(keys, entry.get("loggedAt"))


def verify_entries(
    entries: Sequence[Mapping[str, Any]],
    keys: Mapping[str, Ed25519PublicKey],
    run_id: str | None = None,
    report: Report | None = None,
) -> Report:
    """Links, order, hashes and signatures of a run's entries (in seq order). A legacy
    (version 1) entry may only precede signed ones, and be logged before signing began
    (logged_before_signing; verify_bundle refuses them unless allowed; the API, chain.verify,
    allows them)."""
    report = report or Report()
    report.length = len(entries)
    prev = GENESIS
    seen_signed = False
    for position, entry in enumerate(entries, start=1):
        version = entry.get("version", LEGACY_VERSION)
        problem = ""
        if entry.get("seq") != position:
            problem = f"seq is {entry.get('seq')!r} at position {position}"
        elif run_id is not None and entry.get("runId") != run_id:
            problem = f"belongs to run {entry.get('runId')!r}, not {run_id}"
        elif entry.get("prevHash") != prev:
            problem = "prevHash is not the previous entry's hash"
        elif version == ENTRY_VERSION:
            problem = _signed_entry_problem(entry, keys)
            seen_signed = True
        elif version == LEGACY_VERSION and not seen_signed:
            problem = _legacy_entry_problem(entry, keys)
        else:
            problem = f"unexpected version {version!r}" + (
                " after a signed entry" if version == LEGACY_VERSION else ""
            )
        if problem:
            report.problems.append(Problem(position, problem))
            break  # nothing after a broken link can be trusted
        if version == ENTRY_VERSION:
            report.signed += 1
        else:
            report.legacy += 1
        prev = str(entry["hash"])
    report.head = str(entries[-1].get("hash")) if entries else None
    return report


def _output_name(stage_id: Any) -> str:
    return f"stage {stage_id!r}" if stage_id else "the run"


def verify_outputs(
    entries: Sequence[Mapping[str, Any]], outputs: Iterable[Mapping[str, Any]], report: Report
) -> Report:
    """Each stored output (a stage's, or the run's with stageId None) against the
    outputHash of the entry (`seq`) that recorded it, by that entry's version's rule."""
    by_seq = {
        position: entry for position, entry in enumerate(entries, 1) if entry.get("seq") == position
    }
    for item in outputs:
        seq = item.get("seq")
        entry = by_seq.get(seq) if _is_count(seq) else None
        what = _output_name(item.get("stageId"))
        if entry is None:
            report.problems.append(Problem(None, f"output of {what}: no entry #{seq!r}"))
            continue
        if entry.get("stageId") != item.get("stageId"):
            report.problems.append(Problem(seq, f"does not record the output of {what}"))
            continue
        try:
            legacy = entry.get("version", LEGACY_VERSION) == LEGACY_VERSION
            digest = (legacy_value_hash if legacy else value_hash)(item.get("output"))
        except MALFORMED as exc:
            report.problems.append(
                Problem(seq, f"the stored output of {what} has no canonical JSON ({exc})")
            )
            continue
        if digest != entry.get("outputHash"):
            report.problems.append(
                Problem(seq, f"the stored output of {what} does not match its outputHash")
            )
            continue
        report.outputs_checked += 1
    return report


def recorded_outputs(entries: Sequence[Mapping[str, Any]]) -> dict[Any, Any]:
    """stageId (None for the run) -> seq of the entry whose output an export carries: each
    stage's newest `execute` entry of status `completed`, and the run's newest `complete`
    entry (a completed stage or run keeps its output; audit_trail.stored_outputs)."""
    recorded: dict[Any, Any] = {}
    for entry in entries:
        stage_id, action = entry.get("stageId"), entry.get("action")
        if action == "execute" and entry.get("status") == "completed" and stage_id:
            recorded[str(stage_id)] = entry.get("seq")
        elif action == "complete" and stage_id is None:
            recorded[None] = entry.get("seq")
    return recorded


def verify_outputs_complete(
    entries: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]], report: Report
) -> Report:
    """Every output the entries record (recorded_outputs) is in the bundle: an output
    dropped from it is a problem, as an altered one is."""
    carried = [(item.get("stageId"), item.get("seq")) for item in outputs]
    for stage_id, seq in recorded_outputs(entries).items():
        if (stage_id, seq) not in carried:
            report.problems.append(
                Problem(
                    seq if _is_count(seq) else None,
                    f"records the output of {_output_name(stage_id)}, which the bundle lacks",
                )
            )
    return report


LIVE = ("queued", "in_progress")
# What a run-level entry (stageId null) makes of the run's status; "queued": live again.
RUN_STATUS_AFTER = {
    "submit": "queued",
    "retry-run": "queued",
    "complete": "completed",
    "cancel": "cancelled",
    "deadline": "failed",
}


def recorded_status(entries: Sequence[Mapping[str, Any]]) -> str | None:
    """The run's status as its entries record it: that its last run-level entry leaves
    (RUN_STATUS_AFTER), or `failed` once a stage's `fail` entry follows while it is live.
    "queued" stands for live (queued or in_progress: no entry tells those apart)."""
    status = None
    for entry in entries:
        action = entry.get("action")
        if not isinstance(action, str):
            continue
        if entry.get("stageId") is None and action in RUN_STATUS_AFTER:
            status = RUN_STATUS_AFTER[action]
        elif action == "fail" and status == "queued":
            status = "failed"
    return status


def verify_run_summary(
    run: Mapping[str, Any], entries: Sequence[Mapping[str, Any]], report: Report
) -> Report:
    """The bundle's `run` against its entries: `workflowName` against the submit entry's
    details, `status` against recorded_status, and `errorMessage` null unless the run
    failed or was cancelled. Nothing records the other members (timestamps, the text of
    errorMessage): they are not checked."""

    def mismatch(reason: str) -> None:
        report.problems.append(Problem(None, f"run summary: {reason}"))

    first = entries[0] if entries else {}
    details = first.get("details") if first.get("action") == "submit" else None
    name = details.get("workflowName") if isinstance(details, Mapping) else None
    if name is None:
        mismatch("no submit entry records the workflow's name")
    elif run.get("workflowName") != name:
        mismatch(
            f"workflowName is {run.get('workflowName')!r}, but the submit entry records {name!r}"
        )
    status, claimed = recorded_status(entries), run.get("status")
    if claimed not in (LIVE if status == "queued" else (status,)):
        recorded = "live (queued or in_progress)" if status == "queued" else repr(status)
        mismatch(f"status is {claimed!r}, but the entries record it {recorded}")
    if status in ("queued", "completed") and run.get("errorMessage") is not None:
        mismatch("errorMessage is set, but the entries record no failure or cancel")
    return report


def verify_checkpoint(
    entries: Sequence[Mapping[str, Any]],
    run_id: str,
    checkpoint: Mapping[str, Any],
    keys: Mapping[str, Ed25519PublicKey],
    report: Report,
) -> Report:
    """The signed tree head, the inclusion proof of the run's leaf, and that the chain
    still holds, at the leaf's seq, the head the checkpoint recorded."""
    head = checkpoint.get("head")
    head = head if isinstance(head, Mapping) else {}
    leaf = checkpoint.get("leaf")
    leaf = leaf if isinstance(leaf, Mapping) else {}
    number = head.get("checkpoint")
    name = f"checkpoint {number}"
    found: dict[str, Any] = {"checkpoint": number, "seq": leaf.get("seq"), "valid": False}
    report.checkpoints.append(found)

    def fail(reason: str, seq: int | None = None) -> Report:
        report.problems.append(Problem(seq, f"{name}: {reason}"))
        return report

    if head.get("format") != CHECKPOINT_FORMAT:
        return fail(f"not a {CHECKPOINT_FORMAT} head")
    try:
        digest = object_hash(head)
    except MALFORMED as exc:
        return fail(f"the signed head has no canonical JSON ({exc})")
    if head.get("hash") != digest:
        return fail("the signed head's hash does not match its contents")
    kid = head.get("kid")
    why = signature_valid(keys, kid, digest, head.get("signature")) or signed_while_current(
        keys, kid, head.get("createdAt"), "createdAt"
    )
    if why:
        return fail(f"signed head: {why}")
    if leaf.get("runId") != run_id:
        return fail(f"its leaf is for run {leaf.get('runId')!r}")
    seq, index, size, proof = (
        leaf.get("seq"),
        checkpoint.get("leafIndex"),
        head.get("treeSize"),
        checkpoint.get("proof"),
    )
    if not (_is_count(seq) and _is_count(size) and (index == 0 or _is_count(index))):
        return fail("malformed inclusion proof (seq, leafIndex, treeSize)")
    if not isinstance(proof, list) or not all(isinstance(node, str) for node in proof):
        return fail("malformed inclusion proof (not a list of hex strings)")
    try:
        root = root_from_proof(
            index,
            size,
            leaf_hash(leaf_bytes(run_id, seq, str(leaf.get("hash")))),
            [bytes.fromhex(node) for node in proof],
        )
    except MALFORMED as exc:
        return fail(f"malformed inclusion proof ({exc})")
    if root is None or root.hex() != head.get("rootHash"):
        return fail("the inclusion proof does not lead to the signed root")
    if seq > len(entries):
        return fail(
            f"it recorded entry #{seq} as the run's head, but the trail ends at "
            f"#{len(entries)} (truncated)",
            len(entries) + 1 if entries else 1,
        )
    if entries[seq - 1].get("hash") != leaf.get("hash"):
        return fail("this entry differs from the one the checkpoint recorded", seq)
    found["valid"] = True
    return report


def bundle_shape_problem(bundle: Any) -> str:
    """'' when `bundle` has the members the checks read, of the types they read them as;
    else what is wrong with it."""
    if not isinstance(bundle, Mapping):
        return "the bundle is not a JSON object"
    if bundle.get("format") != BUNDLE_FORMAT:
        return f"not a {BUNDLE_FORMAT} bundle"
    run = bundle.get("run")
    if not isinstance(run, Mapping) or not isinstance(run.get("workflowRunId"), str):
        return "`run` is not an object with a string `workflowRunId`"
    for member in ("entries", "keys", "outputs", "checkpoints"):
        items = bundle.get(member)
        if items is not None and not (
            isinstance(items, list) and all(isinstance(item, Mapping) for item in items)
        ):
            return f"`{member}` is not a list of objects"
    if not bundle.get("entries"):
        return "the bundle has no entries (every run has at least its submit entry)"
    return ""


def verify_bundle(
    bundle: Any, keys: Iterable[Mapping[str, Any]] | None = None, *, allow_legacy: bool = False
) -> Report:
    """Every check on an export bundle. With `keys` (JWKs from a source you trust), those
    are used instead of the keys the bundle carries. Legacy (version 1, unsigned) entries
    are refused unless `allow_legacy`. A malformed bundle is a problem, not an exception."""
    report = Report()
    try:
        _verify_bundle(bundle, keys, allow_legacy, report)
    except MALFORMED as exc:
        report.problems.append(Problem(None, f"malformed bundle ({type(exc).__name__}: {exc})"))
    return report


def _verify_bundle(
    bundle: Any, keys: Iterable[Mapping[str, Any]] | None, allow_legacy: bool, report: Report
) -> None:
    if why := bundle_shape_problem(bundle):
        report.problems.append(Problem(None, why))
        return
    try:
        trusted = key_set(keys if keys is not None else bundle.get("keys") or [])
    except MALFORMED as exc:
        report.problems.append(Problem(None, f"unreadable public key ({exc})"))
        return
    run = bundle["run"]
    run_id = run["workflowRunId"]
    entries = bundle["entries"]
    outputs = bundle.get("outputs") or []
    verify_entries(entries, trusted, run_id, report)
    if report.legacy and not allow_legacy:
        report.problems.append(
            Problem(
                1,
                f"{report.legacy} legacy (version 1) "
                + ("entry, which" if report.legacy == 1 else "entries, which")
                + " no key signed: refused (--allow-legacy accepts them)",
            )
        )
    verify_outputs(entries, outputs, report)
    verify_outputs_complete(entries, outputs, report)
    verify_run_summary(run, entries, report)
    for checkpoint in bundle.get("checkpoints") or []:
        verify_checkpoint(entries, run_id, checkpoint, trusted, report)


# ------------------------------------------------------------------ the command


def _load_keys(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        loaded = json.load(handle)
    if isinstance(loaded, dict) and "data" in loaded:  # the API's envelope, saved as is
        loaded = loaded["data"]
    if isinstance(loaded, dict) and "keys" in loaded:
        loaded = loaded["keys"]
    if isinstance(loaded, dict):
        loaded = [loaded]
    if not isinstance(loaded, list) or not all(isinstance(key, dict) for key in loaded):
        raise ValueError(f'{path}: not a JWK, a list of JWKs or {{"keys": [...]}}')
    return loaded


def _printable(text: str) -> str:
    """`text` for a terminal: escape codes and invisible characters from a bundle escaped."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _run_label(bundle: Any) -> str:
    run = bundle.get("run") if isinstance(bundle, Mapping) else None
    ref = run.get("workflowRunId") if isinstance(run, Mapping) else None
    return _printable(ref) if isinstance(ref, str) else "(no run id)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="maof-verify",
        description="Verify an audit bundle (GET /workflows/{runId}/audit/export) offline.",
    )
    parser.add_argument("bundle", help="the bundle, a JSON file")
    parser.add_argument(
        "--key",
        help="public keys to trust (GET /audit/keys saved as JSON); default: the bundle's own",
    )
    parser.add_argument(
        "--allow-legacy",
        action="store_true",
        help="accept legacy (version 1, unsigned) entries before signed ones, as the API "
        "does; refused by default: no key signed them",
    )
    parser.add_argument(
        "--require-signatures",
        action="store_true",
        help="refuse legacy entries even with --allow-legacy (the default without it)",
    )
    parser.add_argument(
        "--require-checkpoint", action="store_true", help="fail unless a checkpoint covers it"
    )
    args = parser.parse_args(argv)
    try:
        with open(args.bundle, encoding="utf-8") as handle:
            bundle = json.load(handle)
        if isinstance(bundle, dict) and "data" in bundle and "format" not in bundle:
            bundle = bundle["data"]
        keys = _load_keys(args.key) if args.key else None
    except (OSError, ValueError, RecursionError) as exc:
        print(f"maof-verify: cannot read input: {exc}", file=sys.stderr)
        return 1
    report = verify_bundle(
        bundle, keys, allow_legacy=args.allow_legacy and not args.require_signatures
    )
    if args.require_checkpoint and not any(c["valid"] for c in report.checkpoints):
        report.problems.append(Problem(None, "no checkpoint covers this run"))
    run = _run_label(bundle)
    if report.valid:
        covered = [c["checkpoint"] for c in report.checkpoints if c["valid"]]
        print(
            f"OK {run}: {report.length} entries, {report.signed} signed"
            + (f", {report.legacy} legacy" if report.legacy else "")
            + f"; {report.outputs_checked} stored output"
            + ("s match" if report.outputs_checked != 1 else " matches")
            + "; "
            + (f"in checkpoint {', '.join(map(str, covered))}" if covered else "not checkpointed")
            + f"; head {report.head}"
        )
        return 0
    print(f"FAILED {run}:")
    for problem in report.problems:
        print(f"  {_printable(str(problem))}")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
