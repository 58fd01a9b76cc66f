"""Which checkpoints cover a run is S3's word, not only the database index's: the database's
owner, without the signing key, cannot cut a checkpointed run's tail and have GET /audit,
the export or the next checkpoint vouch for it; a read never sees a checkpoint newer than
the entries it read; and a checkpoint's or marker's key holds the one version written (Object
Lock locks versions, not keys): a second PUT is refused, and an extra version or a delete
marker is tampering, never what is read."""

from __future__ import annotations

import json
import secrets
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from botocore.exceptions import ClientError
from sqlalchemy import text

from chalicelib import aws, db
from chalicelib.audit import chain, checkpoints
from chalicelib.audit import verify as rules
from chalicelib.aws import aws_client
from chalicelib.config import get_settings, reset_settings
from chalicelib.core import api as run_ids
from chalicelib.db import session_scope
from chalicelib.workflows import audit_trail
from tests.integration.conftest import owner_connection
from tests.integration.test_audit_signed import (
    audit,
    checkpoint_now,
    export,
    forge_agent,
    maof_verify,
    rewrite_as_owner,
    three_stage_run,
)

pytestmark = pytest.mark.integration

PROJECT_DIR = Path(__file__).resolve().parents[2]


def cut_last_entry(ref: str, drop_index_rows: bool) -> int:
    """What the owner can do without the signing key: delete the run's newest entry (and,
    if asked, its rows of the checkpoint index) behind disabled triggers. Its seq."""
    run_id = run_ids.parse_run_ref(ref)
    with owner_connection() as conn:
        last = conn.execute(
            text("SELECT max(seq) FROM execution_logs WHERE run_id = :r"), {"r": run_id}
        ).scalar_one()
        conn.execute(text("ALTER TABLE execution_logs DISABLE TRIGGER USER"))
        conn.execute(
            text("DELETE FROM execution_logs WHERE run_id = :r AND seq = :s"),
            {"r": run_id, "s": last},
        )
        conn.execute(text("ALTER TABLE execution_logs ENABLE TRIGGER USER"))
        if drop_index_rows:
            drop_index_rows_of(conn, run_id)
    return int(last)


def drop_index_rows_of(conn: Any, run_id: uuid.UUID) -> None:
    conn.execute(text("ALTER TABLE audit_checkpoint_runs DISABLE TRIGGER USER"))
    conn.execute(text("DELETE FROM audit_checkpoint_runs WHERE run_id = :r"), {"r": run_id})
    conn.execute(text("ALTER TABLE audit_checkpoint_runs ENABLE TRIGGER USER"))


def leaves_of(object_key: str) -> list[dict[str, Any]]:
    return list(checkpoints.read_object(object_key)["leaves"])


def verify_export(user: Any, api: Any, ref: str, tmp_path: Any) -> Any:
    bundle = tmp_path / f"{ref}.json"
    bundle.write_text(json.dumps(export(user, ref)))
    keys = tmp_path / "keys.json"
    keys.write_text(api.get("/audit/keys").text)
    return maof_verify(str(bundle), "--key", str(keys), "--require-checkpoint")


# ------------------------------------------------------------------ S3 names the checkpoints


def test_each_checkpointed_run_has_an_object_locked_marker_in_s3(user, poller):
    ref = three_stage_run(user, poller)
    key = checkpoints.checkpoint_once()["objectKey"]
    run_id = run_ids.parse_run_ref(ref)
    marker = checkpoints.marker_key(run_id, key)
    assert marker.startswith(f"checkpoints/runs/{run_id}/")
    s3 = aws_client("s3")
    stored = json.loads(
        s3.get_object(Bucket=get_settings().audit_bucket, Key=marker)["Body"].read()
    )
    leaf = next(leaf for leaf in leaves_of(key) if leaf["runId"] == ref)
    assert stored["object"] == key and stored["leaf"] == leaf
    retention = s3.get_object_retention(Bucket=get_settings().audit_bucket, Key=marker)
    assert retention["Retention"]["Mode"] == "COMPLIANCE"
    assert [c.key for c in checkpoints.listed_checkpoints(run_id)] == [key]


def test_dropping_the_index_rows_does_not_hide_a_cut_tail(user, poller, api, tmp_path):
    ref = three_stage_run(user, poller)
    checkpoint_now()
    assert audit(user, ref)["chain"]["checkpoint"]["status"] == "verified"
    last = cut_last_entry(ref, drop_index_rows=True)
    status = audit(user, ref)["chain"]
    assert status["valid"] is False, status
    assert any(f"recorded entry #{last}" in p and "truncated" in p for p in status["problems"])
    assert status["checkpoint"]["status"] == "mismatch"
    # The next checkpoint does not vouch for the shortened head, and the run stays failed.
    result = checkpoints.checkpoint_once()
    assert "truncated" in result["refused"][ref], result
    if result["checkpoint"] is not None:
        assert all(leaf["runId"] != ref for leaf in leaves_of(result["objectKey"]))
    assert audit(user, ref)["chain"]["valid"] is False
    offline = verify_export(user, api, ref, tmp_path)
    assert offline.returncode == 1 and "truncated" in offline.stdout, offline.stdout


def test_an_index_row_naming_a_missing_object_fails_the_run_not_unavailable(
    user, poller, api, tmp_path
):
    ref = three_stage_run(user, poller)
    number = checkpoint_now()
    cut_last_entry(ref, drop_index_rows=False)
    with owner_connection() as conn:
        conn.execute(text("ALTER TABLE audit_checkpoints DISABLE TRIGGER USER"))
        conn.execute(
            text("UPDATE audit_checkpoints SET object_key = :k WHERE checkpoint = :n"),
            {"k": f"checkpoints/gone-{uuid.uuid4()}.json", "n": number},
        )
        conn.execute(text("ALTER TABLE audit_checkpoints ENABLE TRIGGER USER"))
    status = audit(user, ref)["chain"]
    assert status["valid"] is False, status
    assert status["checkpoint"]["status"] == "mismatch"
    assert any(
        f"checkpoint {number}: its S3 object" in p and "missing" in p for p in status["problems"]
    ), status
    assert "truncated" in " ".join(status["problems"])  # the marker still names the real one
    assert verify_export(user, api, ref, tmp_path).returncode == 1


def test_an_s3_outage_is_unavailable_and_not_a_failure(user, poller, monkeypatch):
    ref = three_stage_run(user, poller)
    checkpoint_now()

    def outage(run_id: uuid.UUID) -> Any:
        raise ConnectionError("S3 did not answer")

    monkeypatch.setattr(checkpoints, "listed_checkpoints", outage)
    status = audit(user, ref)["chain"]
    assert status["valid"] is True and status["checkpoint"] == {"status": "unavailable"}
    assert user.get(f"/workflows/{ref}/audit/export").status_code == 503


# API Gateway's integration timeout: past it the client has a 504, whatever MAOF answers.
API_GATEWAY_TIMEOUT_SECONDS = 29


def test_an_s3_that_never_answers_is_unavailable_within_api_gateways_time(
    user, poller, monkeypatch
):
    """S3 accepts connections and never answers (a VPC route, a stalled NAT): GET …/audit
    answers checkpoint "unavailable", the export and the latest checkpoint 503, each within
    API Gateway's 29 s; with the patient client (3 tries of a 25 s read) they took ~75 s,
    a 504. The checkpointer, a scheduled function, keeps that client."""
    ref = three_stage_run(user, poller)
    checkpoint_now()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # accepts connections (the kernel does), never reads or answers
    real_client = aws.new_client

    def s3_never_answers(service: str, *args: Any, **kwargs: Any) -> Any:
        client = real_client(service, *args, **kwargs)
        if service != "s3":
            return client
        return boto3.session.Session().client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{silent.getsockname()[1]}",
            region_name=get_settings().aws_region,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            config=client.meta.config,  # the timeouts and retries the caller asked for
        )

    checkpoints.reset()  # a cold container: nothing read before
    aws.reset()
    monkeypatch.setattr(aws, "new_client", s3_never_answers)
    try:
        assert aws.aws_client("s3").meta.config.read_timeout == 25  # the checkpointer's

        def timed_get(path: str) -> tuple[requests.Response | None, float]:
            started = time.monotonic()
            try:
                response = requests.get(
                    f"{user.base_url}{path}",
                    headers={"Authorization": f"Bearer {user.token}"},
                    timeout=API_GATEWAY_TIMEOUT_SECONDS,
                )
            except requests.exceptions.ReadTimeout:
                response = None
            return response, time.monotonic() - started

        expected = {
            f"/workflows/{ref}/audit": 200,
            f"/workflows/{ref}/audit/export": 503,
            "/audit/checkpoints/latest": 503,
        }
        with ThreadPoolExecutor(len(expected)) as pool:  # at once: each waits out S3
            answers = dict(zip(expected, pool.map(timed_get, expected), strict=True))
        for path, (response, took) in answers.items():
            assert response is not None, f"GET {path}: no answer in {API_GATEWAY_TIMEOUT_SECONDS} s"
            assert response.status_code == expected[path], f"GET {path}: {response.text}"
            assert took < 20, f"GET {path} took {took:.1f} s"  # room for a slow machine
            if response.status_code == 503:
                assert response.headers.get("Retry-After"), response.headers
    finally:
        monkeypatch.undo()
        aws.reset()
        silent.close()
    chain_status = audit(user, ref)["chain"]
    assert chain_status["valid"] is True, chain_status  # S3's silence failed nothing
    assert chain_status["checkpoint"]["status"] == "verified"


# ------------------------------------------------------------------ a key holds one version

# Object Lock locks versions, not keys: S3 keeps a locked checkpoint, but a PUT at its key
# adds a newer version that a read by key would see. MAOF's own PUTs are conditional
# (LocalStack enforces If-None-Match, as S3 does); the bucket policy that refuses the
# others is AWS's (LocalStack does not enforce bucket policies), so the tests below write
# the extra versions with a plain PUT, as whoever got past it would.


def resign_over(object_key: str) -> None:
    """Re-sign checkpoint `object_key` over the runs' current heads (same number, time and
    predecessor) and PUT it at the same key, unconditionally: a second version."""
    checkpoints.reset()
    original = checkpoints.read_object(object_key)
    with session_scope() as session:
        heads = {
            run_ids.run_ref(row.run_id): (row.seq, row.entry_hash)
            for row in session.execute(
                text(
                    "SELECT DISTINCT ON (run_id) run_id, seq, entry_hash FROM execution_logs "
                    "ORDER BY run_id, seq DESC"
                )
            )
        }
    leaves = [
        {"runId": leaf["runId"], "seq": heads[leaf["runId"]][0], "hash": heads[leaf["runId"]][1]}
        for leaf in original["leaves"]
    ]
    head = original["head"]
    forged = checkpoints.signed_head(
        head["checkpoint"], leaves, head["previousHash"], head["createdAt"]
    )
    aws_client("s3").put_object(
        Bucket=get_settings().audit_bucket,
        Key=object_key,
        Body=json.dumps({"head": forged, "leaves": leaves}).encode(),
    )
    checkpoints.reset()  # a cold container: nothing read before


def versions_of(key: str) -> list[dict[str, Any]]:
    listed = aws_client("s3").list_object_versions(Bucket=get_settings().audit_bucket, Prefix=key)
    return [v for v in listed.get("Versions") or [] if v["Key"] == key]


def test_a_second_put_at_a_checkpoint_or_marker_key_is_refused(user, poller):
    ref = three_stage_run(user, poller)
    key = checkpoints.checkpoint_once()["objectKey"]
    marker = checkpoints.marker_key(run_ids.parse_run_ref(ref), key)
    for written in (key, marker):
        with pytest.raises(ClientError) as refused:
            checkpoints.put_object(written, {"head": {}, "leaves": []})
        assert refused.value.response["Error"]["Code"] == "PreconditionFailed"
        assert len(versions_of(written)) == 1, written


def test_an_extra_version_at_a_checkpoint_key_is_a_mismatch_not_the_newer_object(
    user, poller, api, tmp_path
):
    """The rewrite with the signing key, and the checkpoint re-signed to match it at the
    same key: the read takes the key's one version or reports tampering, never the newest."""
    ref = three_stage_run(user, poller)
    number = checkpoint_now()
    rewrite_as_owner(ref, forge_agent, from_seq=2)
    with session_scope() as session:
        key = session.execute(
            text("SELECT object_key FROM audit_checkpoints WHERE checkpoint = :n"), {"n": number}
        ).scalar_one()
    resign_over(key)
    assert len(versions_of(key)) == 2
    status = audit(user, ref)["chain"]
    assert status["valid"] is False, status
    assert status["checkpoint"]["status"] == "mismatch"
    assert any(
        f"checkpoint {number}: its S3 object {key} holds 2 versions" in p and "tampering" in p
        for p in status["problems"]
    ), status["problems"]
    offline = verify_export(user, api, ref, tmp_path)
    assert offline.returncode == 1, offline.stdout


def test_a_delete_marker_does_not_hide_a_runs_marker(user, poller, api, tmp_path):
    """What the owner of the account could add to a cut tail and dropped index rows: a
    delete marker over the run's marker (Object Lock allows one; it removes no version)."""
    ref = three_stage_run(user, poller)
    key = checkpoints.checkpoint_once()["objectKey"]
    cut_last_entry(ref, drop_index_rows=True)
    marker = checkpoints.marker_key(run_ids.parse_run_ref(ref), key)
    aws_client("s3").delete_object(Bucket=get_settings().audit_bucket, Key=marker)
    checkpoints.reset()
    status = audit(user, ref)["chain"]
    assert status["valid"] is False, status
    assert status["checkpoint"]["status"] == "mismatch"
    assert any("delete markers" in p and "tampering" in p for p in status["problems"]), status
    result = checkpoints.checkpoint_once()
    assert "tampering" in result["refused"][ref], result
    assert verify_export(user, api, ref, tmp_path).returncode == 1


# ------------------------------------------------------------------ the checkpointer


def test_the_checkpointer_refuses_a_head_behind_a_checkpointed_one_and_keeps_the_rest(user, poller):
    cut = three_stage_run(user, poller)
    checkpoint_now()
    cut_last_entry(cut, drop_index_rows=False)
    fresh = three_stage_run(user, poller)
    result = checkpoints.checkpoint_once()
    assert result["checkpoint"] is not None, result
    refs = {leaf["runId"] for leaf in leaves_of(result["objectKey"])}
    assert fresh in refs and cut not in refs
    assert "behind" in result["refused"][cut] and fresh not in result["refused"], result


def test_the_checkpointer_refuses_a_run_whose_checkpointed_entry_was_rewritten(user, poller):
    """With the signing key too: every hash recomputed, same length, index rows dropped."""
    ref = three_stage_run(user, poller)
    checkpoint_now()
    rewrite_as_owner(ref, forge_agent, from_seq=2)
    with owner_connection() as conn:
        drop_index_rows_of(conn, run_ids.parse_run_ref(ref))
    result = checkpoints.checkpoint_once()
    if result["checkpoint"] is not None:
        assert all(leaf["runId"] != ref for leaf in leaves_of(result["objectKey"]))
    assert "rewritten" in result["refused"][ref], result
    assert audit(user, ref)["chain"]["valid"] is False


def discard_late_answer(run_id: uuid.UUID) -> None:
    """What an answer arriving after its run ended does (_discard): an entry appended under
    the run's lock, its head moving on."""
    with session_scope() as session:
        session.execute(
            text("SELECT id FROM workflow_runs WHERE id = :r FOR UPDATE"), {"r": run_id}
        )
        chain.append(
            session,
            run_id,
            "discard",
            "skipped",
            stage_id="extract",
            agent_id="late",
            output={"late": True},
            details={"reason": "the agent answered after the run ended"},
        )


def test_a_head_that_moves_forward_is_checkpointed_again(user, poller):
    ref = three_stage_run(user, poller)
    first = checkpoint_now()
    run_id = run_ids.parse_run_ref(ref)
    discard_late_answer(run_id)
    result = checkpoints.checkpoint_once()
    assert result["checkpoint"] is not None and ref not in result.get("refused", {}), result
    status = audit(user, ref)["chain"]
    assert status["valid"] is True, status
    assert status["checkpoint"]["count"] == 2 and status["checkpoint"]["checkpoint"] > first


@contextmanager
def counted_s3_calls() -> Iterator[list[str]]:
    """The names of the S3 calls made while the block runs (only checkpoints use S3)."""
    calls: list[str] = []

    def count(event_name: str, **kwargs: Any) -> None:
        calls.append(event_name)

    clients = [aws_client("s3"), aws_client("s3", in_request=True)]  # the API's reads
    for s3 in clients:
        s3.meta.events.register("before-call.s3", count)
    try:
        yield calls
    finally:
        for s3 in clients:
            s3.meta.events.unregister("before-call.s3", count)


def test_a_runs_checkpoint_and_its_audit_read_cost_as_many_s3_calls_however_often_it_was_checkpointed(
    user, poller
):
    """A run cancelled and retried over and over is checkpointed each time it ends: the
    checkpointer checks its new head against S3's copy of its newest checkpoint only, and
    GET …/audit reads that one only, so neither costs more S3 calls as checkpoints pile up
    (cold caches: a new Lambda container)."""
    ref = three_stage_run(user, poller)
    run_id = run_ids.parse_run_ref(ref)
    checkpoint_now()
    costs: list[tuple[int, int]] = []
    for _ in range(5):
        discard_late_answer(run_id)  # the head moves on: checkpointed again
        result = checkpoints.checkpoint_once()
        assert result["checkpoint"] is not None and ref not in result["refused"], result
        checkpoints.reset()
        with counted_s3_calls() as screening:  # what a checkpoint reads of this run in S3
            assert checkpoints._add_s3_heads({run_id: []}) == {}
        checkpoints.reset()
        with counted_s3_calls() as reading:
            status = audit(user, ref)["chain"]
        assert status["valid"] is True and status["checkpoint"]["status"] == "verified"
        costs.append((len(screening), len(reading)))
    assert status["checkpoint"]["count"] == 6
    # Each: a LIST of the run's markers, and its newest checkpoint (a LIST of the
    # object's versions and a GET).
    assert costs == [(3, 3)] * 5, costs
    # The export still carries (and reads) every one.
    assert len(export(user, ref)["checkpoints"]) == 6


def put_checkpoint_object(number: int, covered: list[uuid.UUID], markers: bool = True) -> str:
    """A checkpoint object in S3 with a leaf for each of `covered`, and (unless `markers`
    is False) their markers; its key (its hash made up: only what is read of it matters
    here)."""
    key = checkpoints.object_key(number, secrets.token_hex(8))
    leaves = [
        {"runId": run_ids.run_ref(run_id), "seq": 7, "hash": secrets.token_hex(32)}
        for run_id in covered
    ]
    checkpoints.put_object(key, {"head": {"checkpoint": number}, "leaves": leaves})
    for index, run_id in enumerate(covered if markers else []):
        marker = {"checkpoint": number, "object": key, "leafIndex": index}
        checkpoints.put_object(checkpoints.marker_key(run_id, key), marker)
    return key


def retained_bytes(value: Any, seen: set[int]) -> int:
    """The bytes `value` keeps alive through its containers (each object counted once)."""
    if id(value) in seen:
        return 0
    seen.add(id(value))
    size = sys.getsizeof(value)
    if isinstance(value, dict):
        size += sum(retained_bytes(k, seen) + retained_bytes(v, seen) for k, v in value.items())
    elif isinstance(value, list | tuple):
        size += sum(retained_bytes(item, seen) for item in value)
    return size


def api_function_memory_bytes() -> int:
    prod = json.loads((PROJECT_DIR / ".chalice" / "config.json").read_text())["stages"]["prod"]
    api = prod["lambda_functions"]["api_handler"]
    return int(api.get("lambda_memory_size", prod["lambda_memory_size"])) * 1024 * 1024


def test_the_checkpoint_caches_keep_at_most_an_eighth_of_the_api_functions_memory():
    """read_object, _tree and _positions each kept 64 checkpoint objects, bounded by count
    alone: a warm API function that had served the audits of runs in 64 full checkpoints
    kept about 370 MB of its 512. What each keeps of a full checkpoint, times how many it
    keeps, must leave the function room for its requests (an export alone may carry
    MAOF_RUN_MAX_OUTPUT_BYTES of outputs)."""
    runs = [uuid.uuid4() for _ in range(get_settings().audit_checkpoint_max_runs)]
    key = put_checkpoint_object(1, runs, markers=False)  # the caches read the object alone
    checkpoints.reset()
    try:
        caches = (checkpoints.read_object, checkpoints._tree, checkpoints._positions)
        kept = {cache.__name__: retained_bytes(cache(key), set()) for cache in caches}
        most = sum((cache.cache_info().maxsize or 0) * kept[cache.__name__] for cache in caches)
    finally:
        checkpoints.reset()
    assert all(cache.cache_info().maxsize for cache in caches), "unbounded"
    assert most <= api_function_memory_bytes() / 8, (f"{most / 2**20:.0f} MiB", kept)


def test_a_checkpoint_reads_each_older_checkpoint_object_once_however_few_are_cached():
    """The runs a checkpoint screens may have their newest checkpoints in more objects than
    the cache keeps, in turn (runs retried long after they were checkpointed, in the order
    they ended again): each object is read from S3 once, not once per run."""
    objects = checkpoints.CACHED_OBJECTS + 1
    runs = [uuid.uuid4() for _ in range(2 * objects)]
    # Run i is in object i % objects: in order, an object's runs come `objects` runs apart.
    for n in range(objects):
        put_checkpoint_object(n + 1, runs[n::objects])
    earlier: dict[uuid.UUID, list[checkpoints.Checkpointed]] = {run_id: [] for run_id in runs}
    checkpoints.reset()
    try:
        with counted_s3_calls() as calls:
            assert checkpoints._add_s3_heads(earlier) == {}
    finally:
        checkpoints.reset()
    assert sum(call.endswith(".GetObject") for call in calls) == objects
    for index, run_id in enumerate(runs):
        (found,) = earlier[run_id]
        assert (found.number, found.seq) == (index % objects + 1, 7)


def slowed_s3(monkeypatch: Any, seconds: float, during: Any = None) -> None:
    """Every S3 call of the checkpointer's (a run's LIST, a PUT) takes `seconds` more, one
    at a time; `during` runs in the first PUT's place before it."""
    put, listed = checkpoints.put_object, checkpoints.listed_checkpoints
    fired: list[bool] = []

    def slow_put(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        if during is not None and not fired:
            fired.append(True)
            during()
        return put(*args, **kwargs)

    def slow_list(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return listed(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "put_object", slow_put)
    monkeypatch.setattr(checkpoints, "listed_checkpoints", slow_list)
    monkeypatch.setattr(checkpoints, "S3_CONCURRENCY", 1)


def test_no_transaction_stays_open_across_the_checkpointers_s3_calls(user, poller, monkeypatch):
    """Postgres ends a session idle in a transaction for MAOF_DB_IDLE_IN_TRANSACTION_SECONDS.
    A backlog's S3 calls (a LIST and a marker per run, and the checkpoint) add up to far
    more than any one of them: scaled down, each takes 0.3 s and the timeout is 1 s, and the
    checkpoint is still written and recorded."""
    refs = [three_stage_run(user, poller) for _ in range(2)]
    slowed_s3(monkeypatch, 0.3)
    monkeypatch.setenv("MAOF_DB_IDLE_IN_TRANSACTION_SECONDS", "1")
    reset_settings()
    db.reset()
    try:
        result = checkpoints.checkpoint_once()
    finally:
        monkeypatch.undo()
        reset_settings()
        db.reset()
    assert result["checkpoint"] is not None, result
    for ref in refs:
        assert audit(user, ref)["chain"]["checkpoint"]["status"] == "verified"


def advisory_lock_is_free() -> bool:
    """Whether a session of its own gets the checkpointer's lock (given back at once)."""
    with owner_connection() as conn:
        taken = conn.execute(
            text("SELECT pg_try_advisory_lock(:key)"), {"key": checkpoints.ADVISORY_LOCK}
        ).scalar_one()
        if taken:
            conn.execute(
                text("SELECT pg_advisory_unlock(:key)"), {"key": checkpoints.ADVISORY_LOCK}
            )
    return bool(taken)


def test_one_checkpointer_at_a_time_while_it_writes_to_s3(user, poller, monkeypatch):
    """A second checkpointer that starts while the first writes to S3 writes nothing; the
    lock goes when the first ends, whether it wrote its checkpoint or failed."""
    three_stage_run(user, poller)
    second: list[dict[str, Any]] = []
    slowed_s3(monkeypatch, 0, during=lambda: second.append(checkpoints.checkpoint_once()))
    first = checkpoints.checkpoint_once()
    assert first["checkpoint"] is not None, first
    assert second == [{"checkpoint": None, "reason": "another checkpointer is running"}]
    assert advisory_lock_is_free()

    three_stage_run(user, poller)

    def outage(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("S3 did not answer")

    monkeypatch.setattr(checkpoints, "put_object", outage)
    with pytest.raises(ConnectionError):
        checkpoints.checkpoint_once()
    assert advisory_lock_is_free()


def test_refusal_is_a_pure_decision():
    run_id = uuid.uuid4()
    leaf = checkpoints.Leaf(run_id, 5, "e" * 64, datetime.now(UTC))
    before = checkpoints.Checkpointed(number=3, seq=5, head="e" * 64)
    assert checkpoints.refusal(leaf, [before], {5: "e" * 64}) is None
    assert checkpoints.refusal(leaf, [replace(before, seq=4, head="d" * 64)], {4: "d" * 64}) is None
    assert "behind" in (checkpoints.refusal(leaf, [replace(before, seq=6)], {}) or "")
    assert "rewritten" in (checkpoints.refusal(leaf, [before], {5: "f" * 64}) or "")
    assert "rewritten" in (checkpoints.refusal(leaf, [before], {}) or "")


# ------------------------------------------------------------------ one snapshot per read


@pytest.mark.parametrize("read", ["audit", "export"])
def test_a_checkpoint_committed_during_a_read_does_not_flag_a_genuine_run(
    user, poller, api, monkeypatch, read
):
    """An entry appended (a late answer discarded) and checkpointed while GET …/audit
    reads: the read sees neither, not a checkpoint past the entries it read."""
    ref = three_stage_run(user, poller)
    run_id = run_ids.parse_run_ref(ref)
    real = audit_trail.stored_outputs
    fired: list[int] = []

    def interleaved(session: Any, run: Any, entries: Any) -> Any:
        if run.id == run_id and not fired:
            discard_late_answer(run_id)
            fired.append(checkpoint_now())
        return real(session, run, entries)

    monkeypatch.setattr(audit_trail, "stored_outputs", interleaved)
    if read == "audit":
        status = audit(user, ref)["chain"]
        assert status["valid"] is True, status
    else:
        report = rules.verify_bundle(
            export(user, ref), api.get("/audit/keys").json()["data"]["keys"]
        )
        assert report.valid, report.problems
    assert fired
    monkeypatch.setattr(audit_trail, "stored_outputs", real)
    after = audit(user, ref)["chain"]  # read again: the new entry and its checkpoint
    assert after["valid"] is True and after["checkpoint"]["checkpoint"] == fired[0], after
