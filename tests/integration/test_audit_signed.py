"""The signed audit trail against the real stack: entries signed and served as hashed,
checkpoints in S3 that catch a rewrite by the database's owner (even with the signing key),
a truncated tail and a changed stored output; the export bundle verified offline by
`maof-verify`; the public keys and key rotation."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from chalicelib.audit import chain, checkpoints
from chalicelib.audit import keys as audit_keys
from chalicelib.audit import verify as rules
from chalicelib.config import get_settings
from chalicelib.core import api as run_ids
from chalicelib.db import session_scope
from chalicelib.engine import handlers
from tests.integration.conftest import (
    owner_connection,
    register_agent,
    unique_capability,
    wait_for_run,
)

pytestmark = pytest.mark.integration

PROJECT_DIR = Path(__file__).resolve().parents[2]
# Before the test key set was made (its createdAt is when signing began).
BEFORE_SIGNING = datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC)


def three_stage_run(user: Any, poller: Any) -> str:
    capability = unique_capability("signed")
    register_agent(user, capability)
    stages = [
        {"id": "extract", "name": "Extract", "agentCapability": capability},
        {
            "id": "summarize",
            "name": "Summarize",
            "agentCapability": capability,
            "dependencies": ["extract"],
        },
    ]
    response = user.post(
        "/workflows/execute",
        {"workflow": {"name": "signed", "stages": stages}, "input": {"text": "hello", "n": 2**60}},
    )
    assert response.status_code == 202, response.text
    ref = str(response.json()["data"]["workflowRunId"])
    assert wait_for_run(user, ref)["status"] == "completed"
    return ref


def audit(user: Any, ref: str) -> dict[str, Any]:
    response = user.get(f"/workflows/{ref}/audit")
    assert response.status_code == 200, response.text
    return dict(response.json()["data"])


def export(user: Any, ref: str) -> dict[str, Any]:
    response = user.get(f"/workflows/{ref}/audit/export")
    assert response.status_code == 200, response.text
    return dict(response.json()["data"])


def checkpoint_now() -> int:
    result = checkpoints.checkpoint_once()
    assert result["checkpoint"] is not None, result
    return int(result["checkpoint"])


def maof_verify(*args: str) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it: its own process, no MAOF settings needed."""
    return subprocess.run(
        [sys.executable, "-m", "chalicelib.audit.verify", *args],
        capture_output=True,
        text=True,
        cwd=PROJECT_DIR,
        env={"PATH": "/usr/bin:/bin"},
        timeout=60,
    )


def stored_entries(run_ref: str) -> tuple[uuid.UUID, list[Any]]:
    """The run's id and its audit entries as stored, detached (to change and write back)."""
    from sqlalchemy import select

    from chalicelib.db.models import AuditEntry

    run_id = run_ids.parse_run_ref(run_ref)
    with session_scope() as session:
        entries = list(
            session.scalars(
                select(AuditEntry).where(AuditEntry.run_id == run_id).order_by(AuditEntry.seq)
            )
        )
        session.expunge_all()
    return run_id, entries


def rewrite_as_owner(run_ref: str, change: Any, from_seq: int = 1, drop_last: bool = False) -> None:
    """What an attacker with the owner's role and the private signing key can do: change
    entries, recompute every hash and signature from there on, and write them back
    behind the disabled trigger."""
    signer = audit_keys.key_ring().signer
    run_id, entries = stored_entries(run_ref)
    with owner_connection() as conn:
        conn.execute(text("ALTER TABLE execution_logs DISABLE TRIGGER USER"))
        if drop_last:
            conn.execute(
                text("DELETE FROM execution_logs WHERE run_id = :r AND seq = :s"),
                {"r": run_id, "s": entries[-1].seq},
            )
            entries = entries[:-1]
        prev = chain.GENESIS
        for entry in entries:
            if entry.seq >= from_seq:
                if entry.seq == from_seq:
                    change(entry)
                entry.prev_hash = prev
                entry.entry_hash = rules.object_hash(chain.entry_view(entry))
                entry.signature = signer.sign(entry.entry_hash)
                conn.execute(
                    text(
                        "UPDATE execution_logs SET agent_id = :agent_id, details = "
                        "CAST(:details AS jsonb), prev_hash = :prev, entry_hash = :hash, "
                        "signature = :sig WHERE run_id = :r AND seq = :s"
                    ),
                    {
                        "agent_id": entry.agent_id,
                        "details": json.dumps(entry.details),
                        "prev": entry.prev_hash,
                        "hash": entry.entry_hash,
                        "sig": entry.signature,
                        "r": run_id,
                        "s": entry.seq,
                    },
                )
            prev = entry.entry_hash
        conn.execute(text("ALTER TABLE execution_logs ENABLE TRIGGER USER"))


def rewrite_unsigned(run_ref: str, change: Any, logged_at: datetime | None = None) -> None:
    """What the owner's role can do WITHOUT the signing key: change a run's entries and
    write the whole trail back as legacy (version 1, unsigned) entries chained by the old
    rule, their outputHash too; `logged_at`: the time the first one is stamped with (the rest
    a second apart)."""
    run_id, entries = stored_entries(run_ref)
    with owner_connection() as conn:
        stored = [
            *conn.execute(
                text(
                    "SELECT output FROM stage_executions WHERE run_id = :r AND output IS NOT NULL"
                ),
                {"r": run_id},
            ).scalars(),
            *conn.execute(
                text("SELECT output FROM workflow_runs WHERE id = :r AND output IS NOT NULL"),
                {"r": run_id},
            ).scalars(),
        ]
        legacy_hashes = {rules.value_hash(o): rules.legacy_value_hash(o) for o in stored}
        conn.execute(text("ALTER TABLE execution_logs DISABLE TRIGGER USER"))
        prev = chain.GENESIS
        for entry in entries:
            change(entry)
            entry.output_hash = legacy_hashes.get(entry.output_hash, entry.output_hash)
            if logged_at is not None:
                entry.logged_at = logged_at + timedelta(seconds=entry.seq)
            entry.entry_hash = chain.entry_hash(prev, chain.entry_document(entry))
            conn.execute(
                text(
                    "UPDATE execution_logs SET agent_id = :agent_id, details = "
                    "CAST(:details AS jsonb), logged_at = :logged_at, prev_hash = :prev, "
                    "entry_hash = :hash, version = 1, kid = NULL, signature = NULL, "
                    "output_hash = :output_hash "
                    "WHERE run_id = :r AND seq = :s"
                ),
                {
                    "agent_id": entry.agent_id,
                    "output_hash": entry.output_hash,
                    "details": json.dumps(entry.details),
                    "logged_at": entry.logged_at,
                    "prev": prev,
                    "hash": entry.entry_hash,
                    "r": run_id,
                    "s": entry.seq,
                },
            )
            prev = entry.entry_hash
        conn.execute(text("ALTER TABLE execution_logs ENABLE TRIGGER USER"))


def forge_agent(entry: Any) -> None:
    entry.agent_id = "forged-agent"


# ------------------------------------------------------------------ entries


def test_each_served_entry_is_hashed_over_every_served_field_and_signed(user, poller):
    ref = three_stage_run(user, poller)
    data = audit(user, ref)
    keys = rules.key_set(user.get("/audit/keys").json()["data"]["keys"])
    prev = rules.GENESIS
    for seq, entry in enumerate(data["logs"], start=1):
        assert entry["version"] == 2 and entry["seq"] == seq and entry["runId"] == ref
        assert entry["prevHash"] == prev
        body = {k: v for k, v in entry.items() if k not in ("hash", "signature")}
        assert entry["hash"] == rules.sha256_hex(rules.jcs(body))
        keys[entry["kid"]].verify(rules.b64url_decode(entry["signature"]), entry["hash"].encode())
        prev = entry["hash"]
    status = data["chain"]
    assert status["valid"] is True, status
    assert status["signatures"] == {"signed": len(data["logs"]), "legacy": 0}
    assert status["outputsChecked"] == 3  # two stages and the run


def test_the_keys_endpoint_is_public_and_lists_jwks(api):
    response = api.get("/audit/keys")
    assert response.status_code == 200
    keys = response.json()["data"]["keys"]
    assert keys and all(k["kty"] == "OKP" and k["crv"] == "Ed25519" for k in keys)
    assert set(keys[-1]) == {"kid", "kty", "crv", "x", "createdAt", "retiredAt"}
    assert all("d" not in key for key in keys)  # no private half


# ------------------------------------------------------------------ checkpoints


def test_a_checkpoint_is_signed_in_s3_and_served_as_the_latest(user, poller, api):
    ref = three_stage_run(user, poller)
    number = checkpoint_now()
    latest = api.get("/audit/checkpoints/latest")
    assert latest.status_code == 200, latest.text
    served = latest.json()["data"]
    head = served["checkpoint"]
    assert head["checkpoint"] == number and head["format"] == rules.CHECKPOINT_FORMAT
    keys = rules.key_set(api.get("/audit/keys").json()["data"]["keys"])
    assert head["hash"] == rules.object_hash(head)
    assert rules.signature_valid(keys, head["kid"], head["hash"], head["signature"]) == ""
    from chalicelib.aws import aws_client

    stored = json.loads(
        aws_client("s3")
        .get_object(Bucket=get_settings().audit_bucket, Key=served["object"]["key"])["Body"]
        .read()
    )
    assert stored["head"] == head
    assert any(leaf["runId"] == ref for leaf in stored["leaves"])
    lock = aws_client("s3").get_object_lock_configuration(Bucket=get_settings().audit_bucket)
    assert lock["ObjectLockConfiguration"]["Rule"]["DefaultRetention"]["Mode"] == "COMPLIANCE"
    status = audit(user, ref)["chain"]
    assert status["valid"] is True
    assert status["checkpoint"]["status"] == "verified"
    assert status["checkpoint"]["checkpoint"] == number


def test_a_run_is_checkpointed_once_and_again_only_when_its_head_moves(user, poller):
    ref = three_stage_run(user, poller)
    checkpoint_now()
    run_id = run_ids.parse_run_ref(ref)
    with session_scope() as session:
        covered = session.execute(
            text("SELECT count(*) FROM audit_checkpoint_runs WHERE run_id = :r"), {"r": run_id}
        ).scalar()
    assert covered == 1
    assert checkpoints.checkpoint_once()["checkpoint"] is None  # nothing new


def test_a_rewrite_by_the_owner_with_the_signing_key_fails_at_the_checkpoint(user, poller):
    ref = three_stage_run(user, poller)
    checkpoint_now()
    rewrite_as_owner(ref, forge_agent, from_seq=2)
    status = audit(user, ref)["chain"]
    assert status["valid"] is False
    assert any("differs from the one the checkpoint recorded" in p for p in status["problems"])
    assert status["checkpoint"]["status"] == "mismatch"
    # Every hash and signature of the rewritten trail is in order: only S3's copy tells.
    bundle = export(user, ref)
    report = rules.verify_bundle({**bundle, "checkpoints": []})
    assert report.valid
    assert not rules.verify_bundle(bundle).valid


def test_the_same_rewrite_before_any_checkpoint_still_verifies_which_is_why_they_exist(
    user, poller
):
    ref = three_stage_run(user, poller)
    rewrite_as_owner(ref, forge_agent, from_seq=2)
    assert audit(user, ref)["chain"]["valid"] is True


def test_a_truncated_tail_fails_against_the_checkpointed_head(user, poller, tmp_path):
    ref = three_stage_run(user, poller)
    checkpoint_now()
    rewrite_as_owner(ref, lambda entry: None, from_seq=10_000, drop_last=True)
    status = audit(user, ref)["chain"]
    assert status["valid"] is False
    assert any("truncated" in p for p in status["problems"]), status
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(export(user, ref)))
    result = maof_verify(str(path))
    assert result.returncode == 1
    assert "truncated" in result.stdout


def test_a_changed_stored_output_fails_verification(user, poller):
    ref = three_stage_run(user, poller)
    run_id = run_ids.parse_run_ref(ref)
    with session_scope() as session:  # the application role may update stage rows
        session.execute(
            text(
                "UPDATE stage_executions SET output = CAST(:o AS jsonb) "
                "WHERE run_id = :r AND stage_id = 'extract'"
            ),
            {"o": json.dumps({"result": "doctored"}), "r": run_id},
        )
    status = audit(user, ref)["chain"]
    assert status["valid"] is False
    assert any("stored output of stage 'extract'" in p for p in status["problems"]), status
    assert not rules.verify_bundle(export(user, ref)).valid


@pytest.mark.parametrize(
    ("sql", "problem"),
    [
        (
            "UPDATE stage_executions SET status = 'failed', output = NULL, error_message = 'x' "
            "WHERE run_id = :r AND stage_id = 'extract'",
            "records the output of stage 'extract', which the bundle lacks",
        ),
        (
            "UPDATE workflow_runs SET status = 'failed', output = NULL, "
            "error_message = 'Stage extract failed: forged' WHERE id = :r",
            "run summary: status is 'failed', but the entries record it 'completed'",
        ),
    ],
    ids=["stage-row-no-longer-completed", "run-row-no-longer-completed"],
)
def test_the_api_refuses_what_maof_verify_refuses_when_the_app_role_rewrites_a_status(
    user, poller, api, tmp_path, sql, problem
):
    ref = three_stage_run(user, poller)
    checkpoint_now()
    with session_scope() as session:  # the application role may update run and stage rows
        session.execute(text(sql), {"r": run_ids.parse_run_ref(ref)})
    status = audit(user, ref)["chain"]
    assert status["valid"] is False
    assert problem in "\n".join(status["problems"]), status
    assert status["checkpoint"]["status"] == "mismatch"
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(export(user, ref)))
    result = maof_verify(str(path))
    assert result.returncode == 1
    assert problem in result.stdout, result.stdout


# ------------------------------------------------------------------ export and maof-verify


def test_a_bundle_verifies_offline_and_fails_with_one_byte_changed(user, poller, api, tmp_path):
    ref = three_stage_run(user, poller)
    checkpoint_now()
    bundle = export(user, ref)
    assert bundle["format"] == rules.BUNDLE_FORMAT
    assert bundle["checkpoints"] and bundle["checkpoints"][-1]["proof"] is not None
    good = tmp_path / "bundle.json"
    good.write_text(json.dumps(bundle, indent=2))
    keys = tmp_path / "keys.json"
    keys.write_text(api.get("/audit/keys").text)  # the envelope, saved as served
    result = maof_verify(str(good), "--key", str(keys), "--require-checkpoint")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"OK {ref}")

    raw = good.read_text()
    # One byte: the first letter of the first execute entry's action.
    position = raw.index('"action": "execute"') + len('"action": "')
    tampered = tmp_path / "tampered.json"
    tampered.write_text(raw[:position] + "E" + raw[position + 1 :])
    failed = maof_verify(str(tampered), "--key", str(keys))
    assert failed.returncode == 1
    assert "FAILED" in failed.stdout and "entry #" in failed.stdout


def test_the_verifier_needs_no_maof_settings_or_database():
    code = (
        "import sys, chalicelib.audit.verify as v; "
        "assert 'chalicelib.config' not in sys.modules and 'chalicelib.db' not in sys.modules; "
        "print(v.GENESIS)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=PROJECT_DIR,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr


def test_export_of_another_users_run_is_not_found(user, poller, api):
    ref = three_stage_run(user, poller)
    other = api.as_new_user()
    assert other.get(f"/workflows/{ref}/audit/export").status_code == 404
    assert api.get(f"/workflows/{ref}/audit/export").status_code == 401


# ------------------------------------------------------------------ key rotation


def test_key_rotation_keeps_old_runs_verifying(user, poller, api, tmp_path):
    old_ref = three_stage_run(user, poller)
    old_kid = audit(user, old_ref)["logs"][0]["kid"]
    path = Path(get_settings().audit_keys_file)
    before = path.read_text()
    try:
        path.write_text(audit_keys.rotated(before))
        audit_keys.reset()
        new_ref = three_stage_run(user, poller)
        new_kid = audit(user, new_ref)["logs"][0]["kid"]
        assert new_kid != old_kid
        listed = {k["kid"]: k for k in api.get("/audit/keys").json()["data"]["keys"]}
        assert listed[old_kid]["retiredAt"] is not None and listed[new_kid]["retiredAt"] is None
        for ref in (old_ref, new_ref):
            assert audit(user, ref)["chain"]["valid"] is True
            bundle = tmp_path / f"{ref}.json"
            bundle.write_text(json.dumps(export(user, ref)))
            assert maof_verify(str(bundle)).returncode == 0
    finally:
        path.write_text(before)
        audit_keys.reset()


def test_the_checkpoint_schedule_is_a_handler_of_the_app_and_runs_locally():
    import app as maof
    from devstack.poller import from_app

    assert "write_audit_checkpoint" in maof.app.handler_map
    poller = from_app(1)
    assert "write_audit_checkpoint" in [name for name, _, _ in poller.schedules]
    assert handlers.CHECKPOINT_RATE_MINUTES >= 1


def test_a_legacy_entry_verifies_by_the_old_rule_only_before_signed_ones():
    run_id = uuid.uuid4()
    entry = chain.next_entry(run_id, None, None, "submit", "queued")
    entry.version, entry.kid, entry.signature = 1, None, None
    entry.logged_at = BEFORE_SIGNING
    entry.entry_hash = chain.entry_hash(chain.GENESIS, chain.entry_document(entry))
    legacy = chain.entry_view(entry)
    signed = chain.entry_view(chain.next_entry(run_id, 1, entry.entry_hash, "complete", "x"))
    keys = rules.key_set(audit_keys.key_ring().public)
    report = rules.verify_entries([legacy, signed], keys)
    assert report.valid and report.legacy == 1 and report.signed == 1
    assert not rules.verify_entries(
        [signed | {"seq": 1, "prevHash": rules.GENESIS}, legacy], keys
    ).valid


def test_a_new_run_rewritten_unsigned_without_the_key_fails_everywhere(user, poller, tmp_path):
    ref = three_stage_run(user, poller)  # a run of today: every entry of it is signed
    rewrite_unsigned(ref, lambda entry: forge_agent(entry) if entry.action == "execute" else None)
    status = audit(user, ref)["chain"]
    assert status["valid"] is False and status["brokenAtSeq"] == 1, status
    assert "after signing began" in status["problems"][0], status
    result = checkpoints.checkpoint_once()  # refused, not pinned
    assert "after signing began" in result["refused"][ref], result
    assert audit(user, ref)["chain"]["checkpoint"] is None
    bundle = export(user, ref)
    assert not rules.verify_bundle(bundle, allow_legacy=True).valid
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(bundle))
    result = maof_verify(str(path), "--allow-legacy")
    assert result.returncode == 1 and "after signing began" in result.stdout, result.stdout


def test_a_run_whose_unsigned_trail_predates_signing_still_verifies_as_legacy(
    user, poller, tmp_path
):
    ref = three_stage_run(user, poller)
    rewrite_unsigned(ref, lambda entry: None, logged_at=BEFORE_SIGNING)  # as written then
    status = audit(user, ref)["chain"]
    assert status["valid"] is True and status["signatures"] == {"signed": 0, "legacy": 4}
    bundle = export(user, ref)
    assert rules.verify_bundle(bundle, allow_legacy=True).valid
    assert not rules.verify_bundle(bundle).valid  # no key signed them: only when allowed
