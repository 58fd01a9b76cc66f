"""A run's audit trail as the API serves it: the entries, whether they verify (links,
hashes, signatures, stored outputs, checkpoints), the export bundle `maof-verify` checks
offline, the public keys and the newest signed checkpoint."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from chalicelib.audit import chain, checkpoints
from chalicelib.audit import keys as audit_keys
from chalicelib.audit import verify as rules
from chalicelib.core import errors, responses
from chalicelib.core.api import Principal, run_ref
from chalicelib.db import session_scope
from chalicelib.db.models import AuditEntry, StageExecution, WorkflowRun
from chalicelib.logs import logger
from chalicelib.workflows.runs import _own_run, run_summary


def _entries(session: Session, run_id: uuid.UUID) -> list[AuditEntry]:
    return list(
        session.scalars(
            select(AuditEntry).where(AuditEntry.run_id == run_id).order_by(AuditEntry.seq)
        ).all()
    )


def stored_outputs(
    session: Session, run: WorkflowRun, entries: list[AuditEntry]
) -> list[dict[str, Any]]:
    """Each stored output with the entry that recorded its hash: a completed stage's (its
    newest `execute` entry) and a completed run's (its newest `complete` entry)."""
    recorded: dict[str | None, AuditEntry] = {}
    for entry in entries:
        if entry.action == "execute" and entry.status == "completed" and entry.stage_id:
            recorded[entry.stage_id] = entry
        elif entry.action == "complete" and entry.stage_id is None:
            recorded[None] = entry
    outputs = []
    stages = session.execute(
        select(StageExecution.stage_id, StageExecution.output)
        .where(StageExecution.run_id == run.id, StageExecution.status == "completed")
        .order_by(StageExecution.position)
    ).all()
    for stage_id, output in stages:
        recorded_by = recorded.get(stage_id)
        if recorded_by is not None:
            outputs.append(
                {
                    "stageId": stage_id,
                    "seq": recorded_by.seq,
                    "outputHash": recorded_by.output_hash,
                    "output": output,
                }
            )
    if run.status == "completed" and None in recorded:
        entry = recorded[None]
        outputs.append(
            {
                "stageId": None,
                "seq": entry.seq,
                "outputHash": entry.output_hash,
                "output": run.output,
            }
        )
    return outputs


def _checkpoints(session: Session, run_id: uuid.UUID) -> tuple[list[dict[str, Any]], bool]:
    """The run's checkpoints from S3, and whether S3 answered."""
    try:
        return checkpoints.run_checkpoints(session, run_id), True
    except Exception as exc:
        logger.warning("checkpoints unavailable", extra={"error": type(exc).__name__})
        return [], False


def _checkpoint_summary(
    found: list[dict[str, Any]], available: bool, status: chain.ChainStatus
) -> dict[str, Any] | None:
    if not available:
        return {"status": "unavailable"}
    if not found:
        return None
    newest = found[-1]
    head = newest.get("head") or {}
    return {
        "status": "verified" if status.valid else "mismatch",
        "checkpoint": head.get("checkpoint"),
        "createdAt": head.get("createdAt"),
        "rootHash": head.get("rootHash"),
        "treeSize": head.get("treeSize"),
        "seq": (newest.get("leaf") or {}).get("seq"),
        "kid": head.get("kid"),
        "object": newest.get("object"),
        "count": len(found),
    }


def get_audit(principal: Principal, ref: str) -> responses.AuditTrail:
    with session_scope() as session:
        run = _own_run(session, principal, ref)
        entries = _entries(session, run.id)
        outputs = stored_outputs(session, run, entries)
        found, available = _checkpoints(session, run.id)
    status = chain.verify(entries, outputs, found)
    summary = _checkpoint_summary(found, available, status)
    return responses.AuditTrail(
        workflow_run_id=run_ref(run.id),
        logs=[responses.AuditEntry.model_validate(chain.entry_view(e)) for e in entries],
        chain=responses.ChainReport.model_validate({**status.view(), "checkpoint": summary}),
    )


def export(principal: Principal, ref: str) -> responses.AuditBundle:
    """One JSON bundle that `maof-verify` checks offline (docs/audit.md "Verifying a run's
    audit trail")."""
    with session_scope() as session:
        run = _own_run(session, principal, ref)
        entries = _entries(session, run.id)
        outputs = stored_outputs(session, run, entries)
        found, available = _checkpoints(session, run.id)
    if not available:
        raise errors.ServiceUnavailable("The checkpoint store (S3) did not answer; try again")
    views = [chain.entry_view(e) for e in entries]
    used = {view["kid"] for view in views} | {(c.get("head") or {}).get("kid") for c in found}
    keys = [key for key in audit_keys.key_ring().public if key["kid"] in used]
    return responses.AuditBundle.model_validate(
        {
            "format": rules.BUNDLE_FORMAT,
            "run": run_summary(run),
            "entries": views,
            "keys": keys,
            "outputs": outputs,
            "checkpoints": found,
        }
    )


def public_keys() -> responses.PublicKeys:
    return responses.PublicKeys.model_validate(audit_keys.key_ring().jwks())


def latest_checkpoint() -> responses.LatestCheckpoint:
    try:
        found = checkpoints.latest()
    except errors.ApiError:
        raise
    except Exception as exc:
        logger.warning("checkpoint unavailable", extra={"error": type(exc).__name__})
        raise errors.ServiceUnavailable("The checkpoint store (S3) did not answer") from None
    if found is None:
        raise errors.NotFound("No checkpoint has been written yet")
    return responses.LatestCheckpoint.model_validate(found)
