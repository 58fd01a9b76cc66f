"""Key rotation of a deployed stage (`make rotate-key` / `make retire-keys`): the parameters
move in SSM (LocalStack's here) as a prod process then reads them, every function gets new
execution environments, and the migrate function re-encrypts the agent tokens. The whole
command against LocalStack's stack: test_infra_localstack.py."""

from __future__ import annotations

import json
from typing import Any

import boto3
import pytest
from chalice.test import Client

from chalicelib.audit.keys import ring_of
from chalicelib.config import SSM_MIGRATION_SECRETS, SSM_PREVIOUS_KEYS, SSM_SECRETS, load_settings
from infra import DeployError
from infra.deploy import RECYCLE_VARIABLE, Stage, destroy, recycle_functions
from infra.secrets import (
    KEEP_PREVIOUS,
    PREVIOUS,
    ensure_secrets,
    parameter_name,
    retire_previous,
    rotate_key,
)
from tests.integration.conftest import SSM_DATABASE_URL as DATABASE_URL
from tests.integration.conftest import SSM_REDIS_URL as REDIS_URL
from tests.support.aws import answer_calls, offline_stage

pytestmark = pytest.mark.integration


@pytest.fixture
def secrets(ssm: Any, ssm_path: str) -> str:
    ensure_secrets(ssm, ssm_path, urls={"database-url": DATABASE_URL, "redis-url": REDIS_URL})
    return ssm_path


def value(ssm: Any, path: str, name: str) -> str | None:
    found = ssm.get_parameters(Names=[parameter_name(path, name)], WithDecryption=True)
    return found["Parameters"][0]["Value"] if found["Parameters"] else None


@pytest.mark.parametrize(
    ("key", "previous"),
    [("jwt-secret", "jwt-previous-secrets"), ("secret-key", "previous-secret-keys")],
)
def test_rotating_a_key_keeps_the_old_value_as_previous(
    ssm: Any, secrets: str, key: str, previous: str
) -> None:
    history = [value(ssm, secrets, key)]
    for _ in range(3):
        kept = rotate_key(ssm, secrets, key)
        history.insert(0, value(ssm, secrets, key))
        assert kept == history[1 : 1 + KEEP_PREVIOUS]
        assert value(ssm, secrets, previous) == ",".join(kept)
    assert len(set(history)) == 4, "every rotation made a new value"
    stored = value(ssm, secrets, key)
    assert stored is not None and len(stored) >= 32


def test_rotating_the_audit_signing_key_adds_a_key_and_keeps_the_old_public_ones(
    ssm_prod: pytest.MonkeyPatch, ssm: Any, secrets: str
) -> None:
    first = ring_of(str(value(ssm, secrets, "audit-signing-key")))
    for _ in range(2):
        rotate_key(ssm, secrets, "audit-signing-key")
    stored = json.loads(str(value(ssm, secrets, "audit-signing-key")))["keys"]
    assert len(stored) == 3 and stored[0]["kid"] == first.signer.kid
    assert [("d" in key, key["retiredAt"] is None) for key in stored] == [
        (False, False),
        (False, False),
        (True, True),
    ]
    # A prod process signs with the newest and lists all three.
    ring = ring_of(str(load_settings().audit_signing_keys))
    assert ring.signer.kid == stored[-1]["kid"]
    assert [key["kid"] for key in ring.public] == [key["kid"] for key in stored]
    with pytest.raises(DeployError, match="never retired"):
        retire_previous(ssm, secrets, "audit-signing-key")


def test_a_prod_process_accepts_the_current_and_previous_keys(
    ssm_prod: pytest.MonkeyPatch, ssm: Any, secrets: str
) -> None:
    old_jwt, old_key = value(ssm, secrets, "jwt-secret"), value(ssm, secrets, "secret-key")
    rotate_key(ssm, secrets, "jwt-secret")
    rotate_key(ssm, secrets, "secret-key")
    settings = load_settings()
    assert settings.jwt_secret == value(ssm, secrets, "jwt-secret") != old_jwt
    assert settings.jwt_previous_secrets == (old_jwt,)
    assert settings.previous_secret_keys == (old_key,)
    assert retire_previous(ssm, secrets, "jwt-secret") is True
    assert retire_previous(ssm, secrets, "jwt-secret") is False
    from chalicelib.config import _read_ssm_parameters

    _read_ssm_parameters.cache_clear()
    assert load_settings().jwt_previous_secrets == ()


def test_destroy_with_delete_secrets_leaves_no_previous_key_to_trust(
    ssm_prod: pytest.MonkeyPatch, ssm: Any, secrets: str
) -> None:
    """`make destroy DELETE_SECRETS=1` during a rotation (not retired yet): the keys it kept
    as previous go with the rest, so the stage's secrets made anew (`make secrets`) trust
    none of the old ones, to sign in with or to decrypt."""
    for key in PREVIOUS:
        rotate_key(ssm, secrets, key)
    ssm_prod.setenv("AWS_ENDPOINT_URL", ssm.meta.endpoint_url)
    ssm_prod.setenv("AWS_ACCESS_KEY_ID", "test")
    ssm_prod.setenv("AWS_SECRET_ACCESS_KEY", "test")
    ssm_prod.delenv("AWS_PROFILE", raising=False)
    name = secrets.rsplit("/", 1)[1]  # no stack, nor artifacts: only the secrets to delete
    session = boto3.session.Session(region_name="us-east-1")
    stage = Stage(session, name, secrets, artifacts=f"maof-test-artifacts-{name}")
    destroy(stage, confirm=None, remove_secrets=True, poll=1)
    every = [*SSM_SECRETS, *SSM_PREVIOUS_KEYS, *SSM_MIGRATION_SECRETS]
    left = ssm.get_parameters(Names=[parameter_name(secrets, n) for n in every])["Parameters"]
    assert [p["Name"] for p in left] == []
    ensure_secrets(ssm, secrets, urls={"database-url": DATABASE_URL, "redis-url": REDIS_URL})
    settings = load_settings()
    assert (settings.jwt_previous_secrets, settings.previous_secret_keys) == ((), ())


def test_only_the_two_rotating_keys_can_be_rotated(ssm: Any, secrets: str) -> None:
    with pytest.raises(DeployError, match="KEY must be one of"):
        rotate_key(ssm, secrets, "database-url")


def test_rotating_needs_the_key_to_exist(ssm: Any, ssm_path: str) -> None:
    with pytest.raises(DeployError, match="make secrets"):
        rotate_key(ssm, ssm_path, "jwt-secret")


def test_recycling_changes_one_variable_of_every_function_and_keeps_the_rest() -> None:
    variables = {
        "maof-prod-api": {"MAOF_STAGE": "prod"},
        "maof-prod-run_stage": {"MAOF_STAGE": "prod"},
    }

    def respond(operation: str, params: dict[str, Any]) -> dict[str, Any]:
        function = params["FunctionName"]
        if operation == "UpdateFunctionConfiguration":
            variables[function] = params["Environment"]["Variables"]
        return {
            "State": "Active",
            "LastUpdateStatus": "Successful",
            "Environment": {"Variables": dict(variables[function])},
        }

    lambda_ = boto3.client(
        "lambda", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y"
    )
    calls = answer_calls(lambda_.meta.events, "lambda", respond)
    recycle_functions(lambda_, ["maof-prod-api", "maof-prod-run_stage"], "2026-11-27T00:00:00Z")
    updates = calls.of("UpdateFunctionConfiguration")
    assert [u["FunctionName"] for u in updates] == ["maof-prod-api", "maof-prod-run_stage"]
    for values in variables.values():
        assert values == {"MAOF_STAGE": "prod", RECYCLE_VARIABLE: "2026-11-27T00:00:00Z"}


def test_the_stacks_functions_are_found_among_its_resources() -> None:
    def summary(kind: str, name: str) -> dict[str, Any]:
        return {
            "LogicalResourceId": name.upper(),
            "PhysicalResourceId": name,
            "ResourceType": kind,
            "LastUpdatedTimestamp": "2026-03-01T10:00:00Z",
            "ResourceStatus": "CREATE_COMPLETE",
        }

    def pages(params: dict[str, Any]) -> dict[str, Any]:
        assert params["StackName"] == "maof-prod"
        if "NextToken" not in params:
            return {
                "StackResourceSummaries": [
                    summary("AWS::Lambda::Function", "b"),
                    summary("AWS::SQS::Queue", "q"),
                ],
                "NextToken": "page-2",
            }
        return {"StackResourceSummaries": [summary("AWS::Lambda::Function", "a")]}

    assert offline_stage(ListStackResources=pages).functions() == ["a", "b"]


def test_the_migrate_function_reencrypts_agent_tokens_on_request(user: Any) -> None:
    import app as maof
    from tests.integration.conftest import register_agent, unique_capability

    register_agent(user, unique_capability())
    with Client(maof.app) as client:
        answer = client.lambda_.invoke("migrate", {"action": "reencrypt-agent-tokens"}).payload
        assert answer == {"reencrypted": 0, "unreadable": 0}, (
            "every token is already under the current key"
        )
        with pytest.raises(ValueError, match="unknown action"):
            client.lambda_.invoke("migrate", {"action": "drop-everything"})


def test_a_secret_no_key_reads_is_skipped_and_counted_and_the_rest_are_moved(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A token whose key was dropped before it was re-encrypted (InvalidToken) stopped the
    whole pass, for good: every later secret stayed on the old key."""
    import uuid

    from sqlalchemy import text

    import app as maof
    from chalicelib.agents import secrets as stored
    from chalicelib.auth.passwords import hash_password
    from chalicelib.config import get_settings, reset_settings
    from tests.integration.conftest import owner_connection, restore_secret_key

    old_key, new_key, lost_key = get_settings().secret_key, "n" * 40, "l" * 40
    owner = uuid.uuid4()
    # Ids in this order: the unreadable token comes first in the pass.
    lost = uuid.UUID(f"00000000-0000-4000-8000-{uuid.uuid4().int % 10**12:012d}")
    kept = uuid.UUID(f"ffffffff-ffff-4fff-bfff-{uuid.uuid4().int % 10**12:012d}")
    tokens = {
        lost: stored._fernet_of(lost_key).encrypt(b"t1").decode(),
        kept: stored._fernet_of(old_key).encrypt(b"t2").decode(),
    }
    with owner_connection() as conn:
        conn.execute(
            text("INSERT INTO users (id, email, password_hash, name) VALUES (:i, :e, :p, 'R')"),
            {"i": owner, "e": f"re-{owner.hex[:8]}@example.com", "p": hash_password("x" * 10, 4)},
        )
        for agent, token in tokens.items():
            conn.execute(
                text(
                    "INSERT INTO agents (id, agent_id, owner_id, name, endpoint, "
                    "auth_token_encrypted, capabilities, deleted_at) VALUES (:i, :a, :o, 'R', "
                    "'http://127.0.0.1:9/', :t, ARRAY['re-cap'], now())"
                ),
                {"i": agent, "a": f"re-{agent.hex[-8:]}", "o": owner, "t": token},
            )
    monkeypatch.setenv("MAOF_SECRET_KEY", new_key)
    monkeypatch.setenv("MAOF_PREVIOUS_SECRET_KEYS", old_key)
    reset_settings()
    try:
        with Client(maof.app) as client:
            answer = client.lambda_.invoke("migrate", {"action": "reencrypt-agent-tokens"})
        assert answer.payload["unreadable"] == 1, answer.payload
        assert answer.payload["reencrypted"] >= 1, answer.payload
        with owner_connection() as conn:
            now = dict(
                conn.execute(
                    text("SELECT id, auth_token_encrypted FROM agents WHERE owner_id = :o"),
                    {"o": owner},
                ).all()
            )
        assert now[lost] == tokens[lost], "the unreadable token is left as it was"
        assert stored._readable(stored._fernet_of(new_key), now[kept].encode())
    finally:
        with owner_connection() as conn:
            conn.execute(text("DELETE FROM agents WHERE owner_id = :o"), {"o": owner})
            conn.execute(text("DELETE FROM users WHERE id = :o"), {"o": owner})
        restore_secret_key(monkeypatch, old_key, new_key)


def test_reencrypting_callback_secrets_reads_only_the_secrets_not_the_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whole run rows were loaded (definition, input and output: up to 20 MB each), 200 at
    a time, to rewrite a 100-byte secret: the migrate function (512 MB) ran out of memory."""
    import tracemalloc
    import uuid

    from sqlalchemy import text

    from chalicelib.agents import secrets as stored
    from chalicelib.auth.passwords import hash_password
    from chalicelib.config import get_settings, reset_settings
    from tests.integration.conftest import owner_connection, restore_secret_key

    old_key, new_key = get_settings().secret_key, "q" * 40
    owner = uuid.uuid4()
    big = json.dumps({"blob": "x" * 1_000_000})  # a 1 MB output each
    with owner_connection() as conn:
        conn.execute(
            text("INSERT INTO users (id, email, password_hash, name) VALUES (:i, :e, :p, 'B')"),
            {"i": owner, "e": f"big-{owner.hex[:8]}@example.com", "p": hash_password("x" * 10, 4)},
        )
        for _ in range(30):
            conn.execute(
                text(
                    "INSERT INTO workflow_runs (user_id, workflow_name, definition, status, "
                    "output, callback_url, callback_secret_encrypted, callback_state) VALUES "
                    "(:u, 'big', '{}', 'completed', :o, 'https://example.com/cb', :s, 'delivered')"
                ),
                {"u": owner, "o": big, "s": stored.encrypt_token("s")},
            )
    monkeypatch.setenv("MAOF_SECRET_KEY", new_key)
    monkeypatch.setenv("MAOF_PREVIOUS_SECRET_KEYS", old_key)
    reset_settings()
    try:
        tracemalloc.start()
        try:
            done = stored._reencrypt(stored.WorkflowRun, "callback_secret_encrypted")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert done.rewritten >= 30
        assert peak < 10_000_000, f"peak {peak / 1e6:.0f} MB to rewrite 30 secrets of ~100 bytes"
        with owner_connection() as conn:
            moved = conn.execute(
                text("SELECT callback_secret_encrypted FROM workflow_runs WHERE user_id = :u"),
                {"u": owner},
            ).scalars()
            assert all(stored._readable(stored._fernet_of(new_key), s.encode()) for s in moved)
    finally:
        with owner_connection() as conn:
            conn.execute(text("DELETE FROM workflow_runs WHERE user_id = :o"), {"o": owner})
            conn.execute(text("DELETE FROM users WHERE id = :o"), {"o": owner})
        restore_secret_key(monkeypatch, old_key, new_key)
