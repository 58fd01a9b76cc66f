"""The audit hash chain in memory, by the version 1 rule (entries written before signing,
still verified that way): canonical JSON, and verify() catching any alteration, reordering
or removal of entries. The version 2 (signed) rule: test_audit_verify.py."""

from __future__ import annotations

import itertools
import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from chalicelib.audit import verify as rules
from chalicelib.audit.chain import (
    GENESIS,
    ChainStatus,
    canonical_json,
    entry_document,
    entry_hash,
    entry_view,
    sha256_json,
    status_of,
)
from chalicelib.audit.keys import new_jwk
from chalicelib.db.models import AuditEntry

RUN_ID = uuid.UUID("12345678-1234-5678-1234-567812345678")
T0 = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)

STEPS: list[dict[str, Any]] = [
    {"action": "submit", "status": "queued", "input_hash": sha256_json({"q": 1})},
    {
        "action": "execute",
        "status": "completed",
        "stage_id": "a",
        "agent_id": "agent-1",
        "input_hash": sha256_json({"q": 1}),
        "output_hash": sha256_json({"r": "x"}),
        "details": {"attempt": 1, "durationMs": 12},
    },
    {
        "action": "execute",
        "status": "completed",
        "stage_id": "b",
        "agent_id": "agent-2",
        "details": {"attempt": 2, "note": "ünïcödé"},
    },
    {"action": "complete", "status": "completed", "output_hash": sha256_json([1, 2])},
]


def build_chain(steps: list[dict[str, Any]] = STEPS) -> list[AuditEntry]:
    """Entries linked the way chain.append links them."""
    entries = []
    prev = GENESIS
    for seq, fields in enumerate(steps, start=1):
        entry = AuditEntry(
            run_id=RUN_ID,
            seq=seq,
            stage_id=fields.get("stage_id"),
            agent_id=fields.get("agent_id"),
            action=fields["action"],
            status=fields["status"],
            input_hash=fields.get("input_hash"),
            output_hash=fields.get("output_hash"),
            details=fields.get("details"),
            logged_at=T0 + timedelta(seconds=seq),
            prev_hash=prev,
            entry_hash="",
        )
        entry.entry_hash = entry_hash(prev, entry_document(entry))
        prev = entry.entry_hash
        entries.append(entry)
    return entries


# Signing began after T0: these entries are legacy ones written before it.
KEYS = rules.key_set(
    [{name: value for name, value in new_jwk("2026-06-01T00:00:00Z").items() if name != "d"}]
)


def verify(entries: list[AuditEntry]) -> ChainStatus:
    """The entries' checks of GET …/audit (chain.verify checks the whole bundle, by the
    rules test_audit_verify.py tests), as the API reports them."""
    views = [entry_view(entry) for entry in entries]
    return status_of(rules.verify_entries(views, KEYS, views[0]["runId"] if views else None))


# ------------------------------------------------------------------ canonical JSON


def test_canonical_json_sorts_keys_at_every_level_and_has_no_whitespace():
    value = {"b": 1, "a": {"d": [1, {"z": 0, "y": 1}], "c": None}}
    assert canonical_json(value) == b'{"a":{"c":null,"d":[1,{"y":1,"z":0}]},"b":1}'


def test_canonical_json_keeps_non_ascii_as_utf8():
    encoded = canonical_json({"text": "héllo ✓ 日本"})
    assert encoded == '{"text":"héllo ✓ 日本"}'.encode()
    assert b"\\u" not in encoded
    assert json.loads(encoded.decode("utf-8")) == {"text": "héllo ✓ 日本"}


def test_canonical_json_is_independent_of_key_insertion_order():
    assert canonical_json({"x": 1, "y": 2}) == canonical_json({"y": 2, "x": 1})
    assert sha256_json({"x": 1, "y": 2}) == sha256_json({"y": 2, "x": 1})
    assert len(sha256_json(None)) == 64


# ------------------------------------------------------------------ verify


def test_a_good_chain_is_valid_and_its_head_is_the_last_entry_hash():
    entries = build_chain()
    status = verify(entries)
    assert status.valid is True
    assert status.head == entries[-1].entry_hash
    assert status.length == len(STEPS)
    view = status.view()
    assert {k: view[k] for k in ("valid", "head", "length", "brokenAtSeq")} == {
        "valid": True,
        "head": entries[-1].entry_hash,
        "length": len(STEPS),
        "brokenAtSeq": None,
    }
    # Built by the version 1 rule (entries written before signing): legacy, unsigned.
    assert view["signatures"] == {"signed": 0, "legacy": len(STEPS)}


def test_the_first_entry_chains_from_genesis_and_each_links_to_the_previous():
    entries = build_chain()
    assert entries[0].prev_hash == GENESIS
    for previous, entry in itertools.pairwise(entries):
        assert entry.prev_hash == previous.entry_hash


def test_an_empty_chain_is_valid_with_no_head():
    view = verify([]).view()
    assert {k: view[k] for k in ("valid", "head", "length", "brokenAtSeq")} == {
        "valid": True,
        "head": None,
        "length": 0,
        "brokenAtSeq": None,
    }


def test_the_hash_is_the_same_for_the_same_instant_in_another_timezone():
    entries = build_chain()
    entries[1].logged_at = entries[1].logged_at.astimezone(timezone(timedelta(hours=5)))
    assert verify(entries).valid is True


ALTERATIONS: dict[str, Any] = {
    "run_id": uuid.UUID("87654321-4321-8765-4321-876543218765"),
    "seq": 7,
    "stage_id": "forged",
    "agent_id": "forged-agent",
    "action": "skip",
    "status": "failed",
    "input_hash": sha256_json("forged"),
    "output_hash": sha256_json("forged"),
    "details": {"attempt": 1, "durationMs": 13},
    "logged_at": T0 + timedelta(seconds=2, microseconds=1),
    "prev_hash": "f" * 64,
    "entry_hash": "e" * 64,
}


@pytest.mark.parametrize("field", sorted(ALTERATIONS))
def test_altering_any_field_of_an_entry_breaks_the_chain_at_that_entry(field):
    entries = build_chain()
    assert getattr(entries[1], field) != ALTERATIONS[field]
    setattr(entries[1], field, ALTERATIONS[field])
    status = verify(entries)
    assert status.valid is False
    assert status.broken_at == 2
    assert status.view()["brokenAtSeq"] == 2


@pytest.mark.parametrize("field", ["stage_id", "agent_id", "input_hash", "output_hash", "details"])
def test_clearing_an_optional_field_breaks_the_chain(field):
    entries = build_chain()
    assert getattr(entries[1], field) is not None
    setattr(entries[1], field, None)
    assert verify(entries).broken_at == 2


def test_altering_the_last_entry_breaks_the_chain_at_the_last_seq():
    entries = build_chain()
    entries[-1].status = "failed"
    assert verify(entries).view()["brokenAtSeq"] == len(entries)


def test_rehashing_an_altered_entry_still_breaks_the_link_to_the_next():
    entries = build_chain()
    entries[1].agent_id = "forged"
    entries[1].entry_hash = entry_hash(entries[1].prev_hash, entry_document(entries[1]))
    status = verify(entries)
    assert status.valid is False
    assert status.broken_at == 3


def test_reordering_entries_breaks_the_chain_where_the_order_changes():
    entries = build_chain()
    swapped = [entries[0], entries[2], entries[1], entries[3]]
    status = verify(swapped)
    assert status.valid is False
    assert status.broken_at == 2


@pytest.mark.parametrize("dropped", [0, 1, 2])
def test_dropping_an_entry_breaks_the_chain_where_it_was(dropped):
    entries = build_chain()
    del entries[dropped]
    status = verify(entries)
    assert status.valid is False
    assert status.broken_at == dropped + 1
    assert status.length == len(STEPS) - 1


def test_a_forged_seq_is_reported_at_its_position_not_its_claimed_number():
    entries = build_chain()
    entries[1].seq = 999
    assert verify(entries).broken_at == 2


def test_an_entry_of_another_run_spliced_in_is_invalid():
    entries = build_chain()
    foreign = entries[2]
    foreign.run_id = uuid.uuid4()
    foreign.entry_hash = entry_hash(foreign.prev_hash, entry_document(foreign))
    # Rehashed, it is whole in itself: it is caught as belonging to another run.
    assert verify(entries).broken_at == 3
