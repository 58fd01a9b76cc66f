"""A run's audit trail as the API serves it: the entries, whether they verify (every check
`maof-verify` makes on the run's export bundle, by the same code), that bundle, the public
keys and the newest signed checkpoint."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
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


@dataclass(frozen=True)
class _Trail:
    """What one read of a run's audit trail found: the database's rows in one snapshot, and
    the run's checkpoints from S3 (None when S3 did not answer)."""

    run: WorkflowRun
    entries: list[AuditEntry]
    outputs: list[dict[str, Any]]
    covered: checkpoints.RunCheckpoints | None


@checkpoints.read_in_request()
def _read(principal: Principal, ref: str, *, every_checkpoint: bool) -> _Trail:
    """The run's trail; the proofs of all its checkpoints (`every_checkpoint`), or of its
    newest only (checkpoints.run_checkpoints)."""
    with session_scope() as session:
        run_id = _own_run(session, principal, ref).id
    # The run's S3 markers are listed before the snapshot below is taken: every entry a
    # listed checkpoint recorded was committed before its marker was written, so the
    # snapshot holds it, and a checkpoint written meanwhile is in neither.
    try:
        listed: list[checkpoints.Covering] | None = checkpoints.listed_checkpoints(run_id)
    except Exception as exc:
        logger.warning("checkpoints unavailable", extra={"error": type(exc).__name__})
        listed = None
    with session_scope() as session:
        # One snapshot for entries, outputs and the checkpoint index: read one statement
        # at a time (READ COMMITTED), an entry appended and checkpointed in between would
        # make a genuine trail look truncated.
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        run = _own_run(session, principal, ref)
        entries = _entries(session, run.id)
        outputs = stored_outputs(session, run, entries)
        indexed = checkpoints.indexed_checkpoints(session, run.id)
    covered = None
    if listed is not None:
        try:
            covered = checkpoints.run_checkpoints(
                run.id, [*listed, *indexed], every=every_checkpoint
            )
        except Exception as exc:  # S3 did not answer; a missing object is not this
            logger.warning("checkpoints unavailable", extra={"error": type(exc).__name__})
    return _Trail(run, entries, outputs, covered)


def _bundle(trail: _Trail, proofs: list[dict[str, Any]]) -> dict[str, Any]:
    """The export bundle of `trail` with `proofs` as its checkpoints: what `maof-verify`
    checks offline, and what GET …/audit checks with the same code."""
    views = [chain.entry_view(e) for e in trail.entries]
    public = audit_keys.key_ring().public
    used = {view["kid"] for view in views} | {(c.get("head") or {}).get("kid") for c in proofs}
    if any(view["version"] == rules.LEGACY_VERSION for view in views):
        # The first key's createdAt says when signing began: legacy entries must predate it.
        used.add(min(public, key=lambda key: str(key.get("createdAt")))["kid"])
    return {
        "format": rules.BUNDLE_FORMAT,
        "run": responses.RunSummary.model_validate(run_summary(trail.run)).model_dump(
            by_alias=True
        ),
        "entries": views,
        "keys": [key for key in public if key["kid"] in used],
        "outputs": trail.outputs,
        "checkpoints": proofs,
    }


def _verify(trail: _Trail) -> tuple[chain.ChainStatus, list[dict[str, Any]]]:
    """The checks `maof-verify` makes on the run's export bundle, and every checkpoint S3
    or the index names: one whose S3 copy is missing fails the run (the bundle carries it
    as `missing`, which maof-verify fails too; here with why S3 lacks it). With the
    entries as served."""
    covered = trail.covered
    proofs = [p for p in covered.proofs if not p.get("missing")] if covered else []
    bundle = _bundle(trail, proofs)
    status = chain.verify(bundle)
    if covered is not None and covered.problems:
        status = replace(status, valid=False, reasons=[*status.reasons, *covered.problems])
    return status, bundle["entries"]


def _checkpoint_summary(
    covered: checkpoints.RunCheckpoints | None, status: chain.ChainStatus
) -> dict[str, Any] | None:
    if covered is None:
        return {"status": "unavailable"}
    found = covered.proofs
    if not found:
        return None
    # The newest checkpoint S3 holds (a `missing` one has nothing to show but its number).
    newest = next((c for c in reversed(found) if not c.get("missing")), found[-1])
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
        "count": covered.count,
    }


def get_audit(principal: Principal, ref: str) -> responses.AuditTrail:
    # Read often: the newest checkpoint only, a bounded cost (the export reads them all).
    trail = _read(principal, ref, every_checkpoint=False)
    status, views = _verify(trail)
    summary = _checkpoint_summary(trail.covered, status)
    return responses.AuditTrail(
        workflow_run_id=run_ref(trail.run.id),
        logs=[responses.AuditEntry.model_validate(view) for view in views],
        chain=responses.ChainReport.model_validate({**status.view(), "checkpoint": summary}),
    )


def export(principal: Principal, ref: str) -> responses.AuditBundle:
    """One JSON bundle that `maof-verify` checks offline (docs/audit.md "Verifying a run's
    audit trail")."""
    trail = _read(principal, ref, every_checkpoint=True)
    if trail.covered is None:
        raise errors.ServiceUnavailable("The checkpoint store (S3) did not answer; try again")
    return responses.AuditBundle.model_validate(_bundle(trail, trail.covered.proofs))


def public_keys() -> responses.PublicKeys:
    return responses.PublicKeys.model_validate(audit_keys.key_ring().jwks())


@checkpoints.read_in_request()
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
