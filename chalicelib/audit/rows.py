"""Audit entries (built by chain.next_entry) inserted by the statement that causes them,
for callers that already read the head of the run's chain under the run lock (or know the
run is new): what chain.append does, without its extra round trip and the ORM flush.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import text

from chalicelib.core.encoding import dumps
from chalicelib.db.models import AuditEntry

COLUMNS = (
    "run_id, seq, stage_id, agent_id, action, status, input_hash, output_hash, details, "
    "logged_at, prev_hash, entry_hash, version, kid, signature"
)
VALUES = (
    ":e_run_id, :e_seq, :e_stage_id, :e_agent_id, :e_action, :e_status, :e_input_hash, "
    ":e_output_hash, CAST(:e_details AS jsonb), :e_logged_at, :e_prev_hash, :e_entry_hash, "
    ":e_version, :e_kid, :e_signature"
)
INSERT = text(f"INSERT INTO execution_logs ({COLUMNS}) VALUES ({VALUES})")
# Any number of entries in one statement: `SELECT {RECORD_VALUES} FROM {RECORDS}`, with
# :entries the JSON array of their params() (records_json).
RECORDS = (
    "jsonb_to_recordset(CAST(:entries AS jsonb)) AS e(e_run_id uuid, e_seq int, "
    "e_stage_id text, e_agent_id text, e_action text, e_status text, e_input_hash text, "
    "e_output_hash text, e_details text, e_logged_at timestamptz, e_prev_hash text, "
    "e_entry_hash text, e_version smallint, e_kid text, e_signature text)"
)
RECORD_VALUES = (
    "e.e_run_id, e.e_seq, e.e_stage_id, e.e_agent_id, e.e_action, e.e_status, "
    "e.e_input_hash, e.e_output_hash, CAST(e.e_details AS jsonb), e.e_logged_at, "
    "e.e_prev_hash, e.e_entry_hash, e.e_version, e.e_kid, e.e_signature"
)


def records_json(entries: list[AuditEntry]) -> str:
    return dumps([params(entry) for entry in entries])


def params(entry: AuditEntry) -> dict[str, Any]:
    return {
        "e_run_id": entry.run_id,
        "e_seq": entry.seq,
        "e_stage_id": entry.stage_id,
        "e_agent_id": entry.agent_id,
        "e_action": entry.action,
        "e_status": entry.status,
        "e_input_hash": entry.input_hash,
        "e_output_hash": entry.output_hash,
        # JSON null for no details, as the ORM (chain.append) stores it.
        "e_details": dumps(entry.details),
        "e_logged_at": entry.logged_at,
        "e_prev_hash": entry.prev_hash,
        "e_entry_hash": entry.entry_hash,
        "e_version": entry.version,
        "e_kid": entry.kid,
        "e_signature": entry.signature,
    }
