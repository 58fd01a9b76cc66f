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
