"""The version 2 audit rules in memory (chalicelib/audit/verify.py, what `maof-verify` runs):
canonical JSON, signed objects, RFC 6962 Merkle trees and proofs, and the key set."""

from __future__ import annotations

import hashlib
import json

import pytest

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
