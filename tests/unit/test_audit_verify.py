"""The version 2 audit rules in memory (chalicelib/audit/verify.py, what `maof-verify` runs):
canonical JSON, signed objects, RFC 6962 Merkle trees and proofs, and the key set."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from chalicelib.audit import keys as audit_keys
from chalicelib.audit import verify as rules


def test_canonical_json_is_rfc8785_with_big_integers_as_doubles():
    assert (
        rules.jcs({"b": 1, "a": [1.0, "é", None, True]}) == '{"a":[1,"é",null,true],"b":1}'.encode()
    )
    # As JavaScript prints the double: shortest round-trip digits.
    assert rules.jcs(2**60) == rules.jcs(float(2**60)) == b"1152921504606847000"
    assert rules.jcs({"x": 1e21}) == b'{"x":1e+21}'
    assert rules.value_hash({"y": 2, "x": 1}) == hashlib.sha256(b'{"x":1,"y":2}').hexdigest()


def test_an_objects_hash_covers_every_member_but_hash_and_signature():
    obj = {"seq": 1, "kid": "k", "hash": "ignored", "signature": "ignored"}
    assert rules.object_hash(obj) == hashlib.sha256(b'{"kid":"k","seq":1}').hexdigest()
    assert rules.object_hash({**obj, "kid": "other"}) != rules.object_hash(obj)


def test_rfc6962_hashes_of_the_empty_tree_and_of_one_empty_leaf():
    assert rules.merkle_root([]).hex() == hashlib.sha256(b"").hexdigest()
    assert rules.leaf_hash(b"").hex() == (
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    )
    a, b = rules.leaf_hash(b"a"), rules.leaf_hash(b"b")
    assert rules.merkle_root([a, b]) == hashlib.sha256(b"\x01" + a + b).digest()


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17])
def test_every_inclusion_proof_leads_to_the_root_and_only_from_its_leaf(size):
    leaves = [rules.leaf_hash(bytes([i])) for i in range(size)]
    root = rules.merkle_root(leaves)
    for index in range(size):
        proof = rules.inclusion_proof(index, leaves)
        assert rules.root_from_proof(index, size, leaves[index], proof) == root
        other = leaves[(index + 1) % size]
        if size > 1:
            assert rules.root_from_proof(index, size, other, proof) != root
    assert rules.root_from_proof(size, size, leaves[0], []) is None


def test_signed_entries_verify_and_any_change_breaks_them():
    ring = audit_keys.ring_of(audit_keys.new_key_set())
    keys = rules.key_set(ring.public)
    entries, prev = [], rules.GENESIS
    for seq in (1, 2, 3):
        entry = {"version": 2, "runId": "wfr-x", "seq": seq, "action": "a", "prevHash": prev}
        entry["kid"] = ring.signer.kid
        entry["hash"] = rules.object_hash(entry)
        entry["signature"] = ring.signer.sign(entry["hash"])
        entries.append(entry)
        prev = entry["hash"]
    assert rules.verify_entries(entries, keys, "wfr-x").valid
    forged = json.loads(json.dumps(entries))
    forged[1]["action"] = "b"
    report = rules.verify_entries(forged, keys, "wfr-x")
    assert report.broken_at == 2 and "hash does not match" in report.problems[0].reason
    forged[1]["hash"] = rules.object_hash(forged[1])  # rehashed, not re-signed
    assert "signature does not verify" in rules.verify_entries(forged, keys).problems[0].reason
    assert "unknown key" in rules.verify_entries(entries, {}).problems[0].reason


def test_a_key_set_names_keys_by_thumbprint_and_rotation_keeps_the_public_halves():
    first = audit_keys.new_key_set()
    ring = audit_keys.ring_of(first)
    assert ring.signer.kid == audit_keys.thumbprint(ring.public[0]["x"])
    rotated = audit_keys.ring_of(audit_keys.rotated(first))
    assert rotated.signer.kid != ring.signer.kid
    old = rotated.public[0]
    assert old["kid"] == ring.signer.kid and old["retiredAt"] and "d" not in old
    assert [k["retiredAt"] is None for k in rotated.public] == [False, True]
    with pytest.raises(audit_keys.ConfigError):
        audit_keys.ring_of(json.dumps({"keys": [{**ring.public[0], "kid": "wrong"}]}))


# ------------------------------------------------------------------ export bundles

T0 = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
RUN = "wfr-12345678-1234-4678-9234-567812345678"
OUTPUT = {"text": "ünï", "n": 1.5}


def signer_of(jwk: dict[str, Any]) -> audit_keys.Signer:
    """The signer of a private JWK (as a holder of its `d` would sign)."""
    private = Ed25519PrivateKey.from_private_bytes(rules.b64url_decode(jwk["d"]))
    return audit_keys.Signer(jwk["kid"], private)


def sealed(document: dict[str, Any], signer: audit_keys.Signer) -> dict[str, Any]:
    document = {**document, "kid": signer.kid}
    document["hash"] = rules.object_hash(document)
    document["signature"] = signer.sign(document["hash"])
    return document


def entries_of(
    steps: list[dict[str, Any]], signer: audit_keys.Signer | None, at: datetime = T0
) -> list[dict[str, Any]]:
    """A run's chain of `steps`, signed by `signer` (None: legacy, version 1 entries)."""
    entries, prev = [], rules.GENESIS
    for seq, step in enumerate(steps, start=1):
        entry: dict[str, Any] = {
            "version": 2 if signer else 1,
            "runId": RUN,
            "seq": seq,
            "stageId": None,
            "agentId": None,
            "action": step["action"],
            "status": step["status"],
            "inputHash": None,
            "outputHash": None,
            "details": None,
            "loggedAt": (at + timedelta(seconds=seq)).isoformat(timespec="microseconds"),
            "prevHash": prev,
        }
        entry.update({k: v for k, v in step.items() if k in entry})
        if signer:
            entry = sealed(entry, signer)
        else:
            entry |= {"kid": None, "signature": None}
            entry["hash"] = rules.legacy_entry_hash(entry)
        entries.append(entry)
        prev = entry["hash"]
    return entries


COMPLETED_RUN = [
    {"action": "submit", "status": "queued", "details": {"workflowName": "review", "stages": 1}},
    {
        "action": "execute",
        "status": "completed",
        "stageId": "a",
        "agentId": "agent-1",
        "outputHash": rules.value_hash(OUTPUT),
        "details": {"attempt": 1, "durationMs": 3},
    },
    {"action": "complete", "status": "completed", "outputHash": rules.value_hash(OUTPUT)},
]


def checkpoint_of(
    entries: list[dict[str, Any]], signer: audit_keys.Signer, created_at: str
) -> dict[str, Any]:
    """A one-leaf checkpoint of the run's head, signed by `signer`."""
    leaf = {"runId": RUN, "seq": len(entries), "hash": entries[-1]["hash"]}
    root = rules.leaf_hash(rules.leaf_bytes(RUN, leaf["seq"], leaf["hash"]))
    head = {
        "format": rules.CHECKPOINT_FORMAT,
        "checkpoint": 1,
        "treeSize": 1,
        "rootHash": root.hex(),
        "previousHash": None,
        "createdAt": created_at,
    }
    return {"head": sealed(head, signer), "leaf": leaf, "leafIndex": 0, "proof": [], "object": {}}


def bundle_of(
    entries: list[dict[str, Any]], keys: list[dict[str, Any]], **run: Any
) -> dict[str, Any]:
    """The bundle GET …/audit/export serves for a completed run of `entries`."""
    outputs = [
        {"stageId": e["stageId"], "seq": e["seq"], "outputHash": e["outputHash"], "output": OUTPUT}
        for e in entries
        if e["action"] in ("execute", "complete")
    ]
    summary = {
        "workflowRunId": RUN,
        "workflowName": "review",
        "status": "completed",
        "createdAt": T0.isoformat(),
        "startedAt": T0.isoformat(),
        "completedAt": T0.isoformat(),
        "errorMessage": None,
        "deadlineAt": None,
    }
    return {
        "format": rules.BUNDLE_FORMAT,
        "run": summary | run,
        "entries": entries,
        "keys": keys,
        "outputs": outputs,
        "checkpoints": [],
    }


def a_bundle() -> dict[str, Any]:
    ring = audit_keys.ring_of(audit_keys.new_key_set())
    return bundle_of(entries_of(COMPLETED_RUN, ring.signer), ring.public)


def reasons(report: rules.Report) -> str:
    return " | ".join(str(problem) for problem in report.problems)


def run_command(tmp_path: Path, bundle: Any, *args: str, keys: Any = None) -> tuple[int, str]:
    """maof-verify as a user runs it (in process): its exit status and what it printed."""
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(bundle))
    if keys is not None:
        (tmp_path / "keys.json").write_text(json.dumps({"keys": keys}))
        args = (*args, "--key", str(tmp_path / "keys.json"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = rules.main([str(path), *args])
    return status, out.getvalue()


def test_a_genuine_bundle_verifies_offline(tmp_path):
    bundle = a_bundle()
    report = rules.verify_bundle(bundle, bundle["keys"])
    assert report.valid, reasons(report)
    assert (report.length, report.signed, report.outputs_checked) == (3, 3, 2)
    status, printed = run_command(tmp_path, bundle, keys=bundle["keys"])
    assert status == 0 and printed.startswith(f"OK {RUN}: 3 entries, 3 signed"), printed


# B: retired keys


def rotated_keys() -> tuple[audit_keys.Signer, list[dict[str, Any]], datetime]:
    """The old key's signer (its private half in a thief's hands), the public keys after a
    rotation, and when the old key was retired."""
    first = audit_keys.new_key_set()
    old = json.loads(first)["keys"][0]
    public = audit_keys.ring_of(audit_keys.rotated(first)).public
    retired = next(key for key in public if key["kid"] == old["kid"])["retiredAt"]
    return signer_of(old), public, datetime.fromisoformat(retired)


def test_a_retired_key_signs_no_entry_stamped_after_its_retirement(tmp_path):
    old, public, retired = rotated_keys()
    forged = bundle_of(entries_of(COMPLETED_RUN, old, at=retired + timedelta(days=365)), public)
    report = rules.verify_bundle(forged, public)
    assert not report.valid and report.broken_at == 1
    assert "is after key" in reasons(report) and "was retired" in reasons(report)
    status, printed = run_command(tmp_path, forged, keys=public)
    assert status == 1 and printed.startswith("FAILED"), printed
    # What it signed while current verifies, as does what a container that had not yet
    # been recycled signed just after the rotation.
    for at in (retired - timedelta(days=30), retired + rules.RETIREMENT_GRACE / 2):
        genuine = bundle_of(entries_of(COMPLETED_RUN, old, at=at), public)
        assert rules.verify_bundle(genuine, public).valid, at
    # A stamp that is no time cannot show the key was current.
    undated = entries_of([{**COMPLETED_RUN[0], "loggedAt": "yesterday"}], old)
    assert "not a date-time" in reasons(rules.verify_entries(undated, rules.key_set(public), RUN))


def test_a_retired_key_signs_no_checkpoint_created_after_its_retirement():
    old, public, retired = rotated_keys()
    new = rules.key_set(public)
    entries = entries_of(COMPLETED_RUN, old, at=retired - timedelta(days=1))
    late = checkpoint_of(entries, old, (retired + timedelta(days=2)).isoformat())
    report = rules.verify_checkpoint(entries, RUN, late, new, rules.Report())
    assert "checkpoint 1: signed head: createdAt" in reasons(report)
    assert "was retired" in reasons(report)
    on_time = checkpoint_of(entries, old, (retired - timedelta(hours=1)).isoformat())
    assert rules.verify_checkpoint(entries, RUN, on_time, new, rules.Report()).valid


# C: legacy entries


def test_legacy_entries_are_refused_offline_unless_allowed_and_the_api_keeps_them(tmp_path):
    trusted = audit_keys.ring_of(audit_keys.new_key_set()).public
    forged = bundle_of(entries_of(COMPLETED_RUN, None), [])  # no key needed to forge these
    report = rules.verify_bundle(forged, trusted)
    assert not report.valid and report.legacy == 3
    assert "3 legacy (version 1) entries, which no key signed: refused" in reasons(report)
    assert rules.verify_bundle(forged, trusted, allow_legacy=True).valid

    status, printed = run_command(tmp_path, forged, keys=trusted)
    assert status == 1 and "legacy" in printed and "--allow-legacy" in printed, printed
    status, printed = run_command(tmp_path, forged, "--allow-legacy", keys=trusted)
    assert status == 0 and "3 entries, 0 signed, 3 legacy" in printed, printed
    status, _ = run_command(
        tmp_path, forged, "--allow-legacy", "--require-signatures", keys=trusted
    )
    assert status == 1
    # The API's rule (chain.verify calls verify_entries) is unchanged: legacy entries
    # verify there, before signed ones (tests/unit/test_audit_chain.py).
    api = rules.verify_entries(forged["entries"], rules.key_set(trusted), RUN)
    assert api.valid and api.legacy == 3


def test_legacy_entries_logged_since_signing_began_are_refused_even_when_allowed(tmp_path):
    made = datetime(2026, 3, 1, tzinfo=UTC)  # signing began: the first key's createdAt
    first = audit_keys.new_jwk(made.isoformat())
    trusted = [{name: first[name] for name in audit_keys.PUBLIC_MEMBERS}]
    # The owner's rewrite of a run of today, without the key: it chains, unsigned.
    late = bundle_of(entries_of(COMPLETED_RUN, None, at=made + rules.SIGNING_GRACE), [])
    report = rules.verify_bundle(late, trusted, allow_legacy=True)
    assert not report.valid and report.broken_at == 1
    assert "after signing began (2026-03-01T00:00:00+00:00)" in reasons(report)
    status, printed = run_command(tmp_path, late, "--allow-legacy", keys=trusted)
    assert status == 1 and "after signing began" in printed, printed
    # Logged before, or within the hour the release before signing still wrote them.
    for at in (T0, made + rules.SIGNING_GRACE - timedelta(seconds=4)):
        kept = bundle_of(entries_of(COMPLETED_RUN, None, at=at), [])
        assert rules.verify_bundle(kept, trusted, allow_legacy=True).valid, at
    # With no key saying when signing began, no unsigned entry can be placed before it.
    undated = [{**trusted[0], "createdAt": None}]
    report = rules.verify_bundle(
        bundle_of(entries_of(COMPLETED_RUN, None), []), undated, allow_legacy=True
    )
    assert "no key says when signing began" in reasons(report)


# D: the run summary


@pytest.mark.parametrize(
    ("member", "value", "why"),
    [
        ("status", "failed", "status is 'failed', but the entries record it 'completed'"),
        ("status", "in_progress", "status is 'in_progress'"),
        ("workflowName", "other", "workflowName is 'other', but the submit entry records 'review'"),
        ("errorMessage", "Stage 'a' (A) failed: forged", "errorMessage is set"),
    ],
)
def test_a_run_summary_that_disagrees_with_the_entries_fails(tmp_path, member, value, why):
    bundle = a_bundle()
    bundle["run"][member] = value
    report = rules.verify_bundle(bundle, bundle["keys"])
    assert f"run summary: {why}" in reasons(report)
    status, printed = run_command(tmp_path, bundle, keys=bundle["keys"])
    assert status == 1 and "run summary" in printed


def test_the_run_summarys_timestamps_are_covered_by_no_entry():
    bundle = a_bundle()
    bundle["run"]["completedAt"] = "1999-01-01T00:00:00+00:00"  # documented: not checked
    assert rules.verify_bundle(bundle, bundle["keys"]).valid


@pytest.mark.parametrize(
    ("actions", "status"),
    [
        (["submit"], "queued"),
        (["submit", "execute", "complete"], "completed"),
        (["submit", "fail", "skip"], "failed"),
        (["submit", "fail", "skip", "retry-run"], "queued"),
        (["submit", "fail", "skip", "retry-run", "execute", "complete"], "completed"),
        (["submit", "cancel", "discard", "fail"], "cancelled"),
        (["submit", "deadline"], "failed"),
    ],
)
def test_the_entries_record_the_runs_status(actions, status):
    stage_actions = {"execute", "fail", "skip", "discard"}
    entries = [
        {"action": action, "stageId": "a" if action in stage_actions else None}
        for action in actions
    ]
    assert rules.recorded_status(entries) == status


# H: malformed bundles


def _deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


MALFORMED_BUNDLES = {
    "entry-not-object": lambda b: b.__setitem__("entries", ["x"]),
    "entries-string": lambda b: b.__setitem__("entries", "abc"),
    "inf": lambda b: b["entries"][0].__setitem__("details", {"n": float("inf")}),
    "huge-int": lambda b: b["entries"][0].__setitem__("details", {"n": 10**400}),
    "huge-int-output": lambda b: b["outputs"][0].__setitem__("output", 10**400),
    "output-no-stageId": lambda b: b.__setitem__("outputs", [{"seq": 1, "output": 1}]),
    "output-seq-list": lambda b: b["outputs"][0].__setitem__("seq", [2]),
    "run-string": lambda b: b.__setitem__("run", "x"),
    "run-id-number": lambda b: b["run"].__setitem__("workflowRunId", 7),
    "checkpoint-string": lambda b: b.__setitem__("checkpoints", ["x"]),
    "checkpoint-head-string": lambda b: b.__setitem__("checkpoints", [{"head": "x"}]),
    "keys-string": lambda b: b.__setitem__("keys", "abc"),
    "key-not-object": lambda b: b.__setitem__("keys", ["x"]),
    "short-x": lambda b: b.__setitem__(
        "keys", [{"kid": "k", "kty": "OKP", "crv": "Ed25519", "x": "AA"}]
    ),
    "stage-id-list": lambda b: b["entries"][1].__setitem__("stageId", ["a"]),
    "no-entries": lambda b: b.__setitem__("entries", []),
    "not-an-object": lambda b: b.clear(),
}


@pytest.mark.parametrize("mutate", MALFORMED_BUNDLES.values(), ids=MALFORMED_BUNDLES.keys())
def test_a_malformed_bundle_fails_with_a_reason_not_a_traceback(tmp_path, mutate):
    bundle = a_bundle()
    mutate(bundle)
    report = rules.verify_bundle(bundle)  # never raises
    assert not report.valid and all(problem.reason for problem in report.problems)
    status, printed = run_command(tmp_path, bundle if bundle else [])
    assert status == 1 and printed.startswith("FAILED"), printed
    assert len(printed.splitlines()) >= 2  # and why


def test_nesting_too_deep_is_a_problem_or_unreadable_input(tmp_path, capsys):
    bundle = a_bundle()
    bundle["entries"][0]["details"] = _deep(100_000)
    assert "no canonical JSON" in reasons(rules.verify_bundle(bundle, bundle["keys"]))
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    assert rules.main([str(path)]) == 1
    assert "maof-verify: cannot read input" in capsys.readouterr().err


def test_a_checkpoint_with_a_malformed_proof_fails_with_a_reason():
    ring = audit_keys.ring_of(audit_keys.new_key_set())
    entries = entries_of(COMPLETED_RUN, ring.signer)
    keys = rules.key_set(ring.public)
    for change in (
        {"proof": "00"},
        {"proof": ["zz"]},
        {"leafIndex": "0"},
        {"leaf": {"runId": RUN, "seq": 1.5, "hash": entries[-1]["hash"]}},
        {"leaf": {"runId": RUN, "seq": 10**400, "hash": entries[-1]["hash"]}},
    ):
        checkpoint = checkpoint_of(entries, ring.signer, T0.isoformat()) | change
        report = rules.verify_checkpoint(entries, RUN, checkpoint, keys, rules.Report())
        assert not report.valid and "checkpoint 1: " in reasons(report), change


# I: signatures, bundle keys, outputs


def test_base64url_has_one_spelling_per_value():
    data = bytes(range(64))
    text = rules.b64url_encode(data)
    assert rules.b64url_decode(text) == data
    for spelling in ("!" + text, text + "==", text[:10] + "*.*" + text[10:], text + "\n"):
        with pytest.raises(ValueError):
            rules.b64url_decode(spelling)
    assert rules.b64url_encode(b"\xff") == "_w"
    with pytest.raises(ValueError):  # spare bits set: another text for the same byte
        rules.b64url_decode("_x")


def test_a_signature_with_characters_added_does_not_verify():
    bundle = a_bundle()
    signature = bundle["entries"][0]["signature"]
    bundle["entries"][0]["signature"] = "!" + signature[:10] + "*.*" + signature[10:]
    report = rules.verify_bundle(bundle, bundle["keys"])
    assert report.broken_at == 1 and "not base64url" in reasons(report)


def test_a_bundle_key_under_a_kid_that_is_not_its_thumbprint_is_refused():
    bundle = a_bundle()
    real_kid = bundle["entries"][0]["kid"]
    mine = audit_keys.ring_of(audit_keys.new_key_set())
    impostor = audit_keys.Signer(real_kid, mine.signer.private)
    bundle["keys"] = [{**mine.public[0], "kid": real_kid}]
    bundle["entries"] = entries_of(COMPLETED_RUN, impostor)  # every entry re-signed
    report = rules.verify_bundle(bundle)  # no --key: the bundle's own keys
    assert not report.valid and "is not its RFC 7638 thumbprint" in reasons(report)
    assert rules.thumbprint(mine.public[0]["x"]) == audit_keys.thumbprint(mine.public[0]["x"])


def test_an_output_the_entries_record_cannot_be_dropped_from_a_bundle(tmp_path):
    bundle = a_bundle()
    bundle["outputs"] = []
    report = rules.verify_bundle(bundle, bundle["keys"])
    assert [str(p) for p in report.problems] == [
        "entry #2: records the output of stage 'a', which the bundle lacks",
        "entry #3: records the output of the run, which the bundle lacks",
    ]
    status, printed = run_command(tmp_path, bundle, keys=bundle["keys"])
    assert status == 1 and "which the bundle lacks" in printed
    # An answer discarded after the run ended is recorded by its hash, and not kept.
    discarded = [
        {"seq": 1, "action": "submit", "status": "queued", "stageId": None},
        {"seq": 2, "action": "cancel", "status": "cancelled", "stageId": None},
        {"seq": 3, "action": "discard", "status": "cancelled", "stageId": "a", "outputHash": "h"},
    ]
    assert rules.recorded_outputs(discarded) == {}


def test_legacy_entries_outputs_verify_by_the_old_rule_and_signed_ones_by_jcs(tmp_path):
    """Before 0007 outputHash was taken over json.dumps(sort_keys, compact, UTF-8): 1.0
    stays `1.0` there, and JCS writes `1`, so the two rules give different hashes."""
    output = {"score": 1.0, "label": "é"}
    assert rules.legacy_value_hash(output) != rules.value_hash(output)
    old = hashlib.sha256('{"label":"é","score":1.0}'.encode()).hexdigest()
    assert rules.legacy_value_hash(output) == old

    def run_of(signer: audit_keys.Signer | None, digest: str) -> dict[str, Any]:
        steps = [
            COMPLETED_RUN[0],
            COMPLETED_RUN[1] | {"outputHash": digest},
            COMPLETED_RUN[2] | {"outputHash": digest},
        ]
        bundle = bundle_of(entries_of(steps, signer), [])
        for item in bundle["outputs"]:
            item["output"] = output
        return bundle

    trusted = audit_keys.ring_of(audit_keys.new_key_set())
    legacy = run_of(None, old)
    report = rules.verify_bundle(legacy, trusted.public, allow_legacy=True)
    assert report.valid and report.outputs_checked == 2, reasons(report)
    status, printed = run_command(tmp_path, legacy, "--allow-legacy", keys=trusted.public)
    assert status == 0, printed
    report = rules.verify_bundle(
        run_of(None, rules.value_hash(output)), trusted.public, allow_legacy=True
    )
    assert "does not match its outputHash" in reasons(report)
    signed = run_of(trusted.signer, rules.value_hash(output))
    assert rules.verify_bundle(signed, trusted.public).valid
    report = rules.verify_bundle(run_of(trusted.signer, old), trusted.public)
    assert "does not match its outputHash" in reasons(report)
