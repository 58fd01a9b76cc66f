"""Verify a run's audit trail offline: hashes, links, Ed25519 signatures, stored outputs and
inclusion in signed Merkle checkpoints (`maof-verify BUNDLE.json [--key KEYS.json]`).

Standalone on purpose: only the standard library, `rfc8785` and `cryptography`, no MAOF
settings or database, so the API (chain.py) and anyone holding a bundle and the public keys
run the very same checks. docs/audit.md "Verifying a run's audit trail" states each rule.

The rules (version 2 entries):
- hash      = lowercase hex SHA-256 of the RFC 8785 (JCS) canonical JSON of the entry
              object without its `hash` and `signature` members;
- prevHash  = the previous entry's `hash`; 64 zeros for the first entry (seq 1);
- signature = Ed25519 over the ASCII bytes of `hash`, base64url without padding, by the key
              named `kid` (a JWK of /audit/keys);
- numbers are IEEE-754 doubles, as JSON.parse reads them: an integer beyond ±(2^53-1) is
  canonicalised as the double nearest it;
- outputHash (and inputHash) = hex SHA-256 of the JCS of the value;
- a checkpoint leaf is the JCS of {"runId", "seq", "hash"} (a run's head when it was
  checkpointed); leaf hash = SHA-256(0x00 || leaf), node = SHA-256(0x01 || left || right)
  (RFC 6962 §2.1), and the checkpoint's signed head carries the root (`rootHash`) and is
  hashed and signed by the entry rule.
Entries written before signing existed (`version` 1) chain as sha256(prevHash + sorted-key
JSON of the old document); they carry no signature and are reported as legacy.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def public_key_of(jwk: Mapping[str, Any]) -> Ed25519PublicKey:
    if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
        raise ValueError(f"key {jwk.get('kid')!r} is not an Ed25519 OKP key")
    return Ed25519PublicKey.from_public_bytes(b64url_decode(str(jwk["x"])))


def key_set(keys: Iterable[Mapping[str, Any]]) -> dict[str, Ed25519PublicKey]:
    """kid -> public key, from JWKs (as GET /audit/keys lists them)."""
    return {str(jwk["kid"]): public_key_of(jwk) for jwk in keys}


def signature_valid(keys: Mapping[str, Ed25519PublicKey], kid: Any, digest: str, sig: Any) -> str:
    """'' when `sig` is kid's Ed25519 signature of the ASCII bytes of `digest`, else why not."""
    if not isinstance(kid, str) or kid not in keys:
        return f"unknown key id {kid!r}"
    if not isinstance(sig, str) or not sig:
        return "no signature"
    try:
        keys[kid].verify(b64url_decode(sig), digest.encode("ascii"))
    except (InvalidSignature, ValueError):
        return f"signature does not verify with key {kid}"
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


def verify_entries(
    entries: Sequence[Mapping[str, Any]],
    keys: Mapping[str, Ed25519PublicKey],
    run_id: str | None = None,
    report: Report | None = None,
) -> Report:
    """Links, order, hashes and signatures of a run's entries (in seq order). A legacy
    (version 1) entry may only precede signed ones."""
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
            if entry.get("hash") != object_hash(entry):
                problem = "hash does not match the entry's contents"
            else:
                problem = signature_valid(
                    keys, entry.get("kid"), str(entry["hash"]), entry.get("signature")
                )
            seen_signed = True
        elif version == LEGACY_VERSION and not seen_signed:
            if entry.get("hash") != legacy_entry_hash(entry):
                problem = "hash does not match the entry's contents (version 1 rule)"
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


def verify_outputs(
    entries: Sequence[Mapping[str, Any]], outputs: Iterable[Mapping[str, Any]], report: Report
) -> Report:
    """Each stored output (a stage's, or the run's with stageId None) against the
    outputHash of the entry (`seq`) that recorded it."""
    by_seq = {entry.get("seq"): entry for entry in entries}
    for item in outputs:
        seq = item.get("seq")
        entry = by_seq.get(seq)
        what = f"stage {item['stageId']!r}" if item.get("stageId") else "the run"
        if entry is None:
            report.problems.append(Problem(None, f"output of {what}: no entry #{seq}"))
            continue
        if entry.get("stageId") != item.get("stageId"):
            report.problems.append(Problem(seq, f"does not record the output of {what}"))
            continue
        if value_hash(item.get("output")) != entry.get("outputHash"):
            report.problems.append(
                Problem(seq, f"the stored output of {what} does not match its outputHash")
            )
            continue
        report.outputs_checked += 1
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
    head = checkpoint.get("head") or {}
    leaf = checkpoint.get("leaf") or {}
    number = head.get("checkpoint")
    name = f"checkpoint {number}"
    found: dict[str, Any] = {"checkpoint": number, "seq": leaf.get("seq"), "valid": False}
    report.checkpoints.append(found)

    def fail(reason: str, seq: int | None = None) -> Report:
        report.problems.append(Problem(seq, f"{name}: {reason}"))
        return report

    if head.get("format") != CHECKPOINT_FORMAT:
        return fail(f"not a {CHECKPOINT_FORMAT} head")
    if head.get("hash") != object_hash(head):
        return fail("the signed head's hash does not match its contents")
    why = signature_valid(keys, head.get("kid"), str(head["hash"]), head.get("signature"))
    if why:
        return fail(f"signed head: {why}")
    if leaf.get("runId") != run_id:
        return fail(f"its leaf is for run {leaf.get('runId')!r}")
    try:
        proof = [bytes.fromhex(str(item)) for item in checkpoint.get("proof") or []]
        root = root_from_proof(
            int(checkpoint["leafIndex"]),
            int(head["treeSize"]),
            leaf_hash(leaf_bytes(run_id, int(leaf["seq"]), str(leaf["hash"]))),
            proof,
        )
    except (KeyError, TypeError, ValueError) as exc:
        return fail(f"malformed inclusion proof ({exc})")
    if root is None or root.hex() != head.get("rootHash"):
        return fail("the inclusion proof does not lead to the signed root")
    seq = int(leaf["seq"])
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


def verify_bundle(
    bundle: Mapping[str, Any], keys: Iterable[Mapping[str, Any]] | None = None
) -> Report:
    """Every check on an export bundle. With `keys` (JWKs from a source you trust), those
    are used instead of the keys the bundle carries."""
    report = Report()
    if bundle.get("format") != BUNDLE_FORMAT:
        report.problems.append(Problem(None, f"not a {BUNDLE_FORMAT} bundle"))
        return report
    try:
        trusted = key_set(keys if keys is not None else bundle.get("keys") or [])
    except (KeyError, TypeError, ValueError) as exc:
        report.problems.append(Problem(None, f"unreadable public key ({exc})"))
        return report
    run_id = str((bundle.get("run") or {}).get("workflowRunId"))
    entries = list(bundle.get("entries") or [])
    verify_entries(entries, trusted, run_id, report)
    verify_outputs(entries, bundle.get("outputs") or [], report)
    for checkpoint in bundle.get("checkpoints") or []:
        verify_checkpoint(entries, run_id, checkpoint, trusted, report)
    return report


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
    return list(loaded)


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
        "--require-signatures",
        action="store_true",
        help="fail on legacy (version 1, unsigned) entries",
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
    except (OSError, ValueError) as exc:
        print(f"maof-verify: cannot read input: {exc}", file=sys.stderr)
        return 1
    report = verify_bundle(bundle, keys)
    if args.require_signatures and report.legacy:
        report.problems.append(Problem(1, f"{report.legacy} legacy (unsigned) entries"))
    if args.require_checkpoint and not any(c["valid"] for c in report.checkpoints):
        report.problems.append(Problem(None, "no checkpoint covers this run"))
    run = (bundle.get("run") or {}).get("workflowRunId") if isinstance(bundle, dict) else None
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
        print(f"  {problem}")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
