"""load_settings: dev defaults, and one-line refusals of what production must not run with."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from chalicelib import config, db
from chalicelib.agents import network
from chalicelib.config import (
    DEV_JWT_SECRET,
    DEV_MIGRATION_DATABASE_URL,
    DEV_SECRET_KEY,
    ConfigError,
    Settings,
    load_settings,
    reset_settings,
)

ROOT = Path(__file__).resolve().parents[2]
PROD_SECRET = "p" * 32
PROD_ENV = {
    "MAOF_STAGE": "prod",
    "MAOF_JWT_SECRET": PROD_SECRET,
    "MAOF_SECRET_KEY": "k" * 32,
    "MAOF_DATABASE_URL": "postgresql://maof:hunter2@db.internal:5432/maof?sslmode=verify-full",
    "MAOF_REDIS_URL": "rediss://cache.internal:6379/0",
}


@pytest.fixture(autouse=True)
def no_inherited_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start from no MAOF_* settings, whatever the shell running the tests exported."""
    for name in [n for n in os.environ if n.startswith("MAOF_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def prod(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A complete, valid production environment; tests then break one thing."""
    for name, value in PROD_ENV.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def refusal(match: str) -> str:
    """The message of the ConfigError load_settings raises, checked to be one line."""
    with pytest.raises(ConfigError, match=match) as caught:
        load_settings()
    message = str(caught.value)
    assert message
    assert "\n" not in message
    assert "\r" not in message
    return message


def test_a_complete_prod_environment_loads(prod: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert isinstance(settings, Settings)
    assert settings.stage == "prod"
    assert not settings.is_dev
    assert settings.jwt_secret == PROD_SECRET
    assert settings.aws_endpoint_url is None


def test_prod_accepts_a_jwt_secret_of_32_characters_or_more(prod: pytest.MonkeyPatch) -> None:
    for length in (32, 33, 64, 200):
        prod.setenv("MAOF_JWT_SECRET", "s" * length)
        assert load_settings().jwt_secret == "s" * length


def test_prod_refuses_a_missing_jwt_secret(prod: pytest.MonkeyPatch) -> None:
    prod.delenv("MAOF_JWT_SECRET")
    refusal("MAOF_JWT_SECRET")


def test_a_stage_with_ssm_secrets_never_takes_the_published_dev_jwt_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAOF_STAGE", "dev")
    assert load_settings().jwt_secret == DEV_JWT_SECRET
    # Secrets in SSM (the dev stage deployed): SSM's JWT secret, or none for the functions
    # that may not read it (ssm_names), never the one in this repository.
    monkeypatch.setattr(config, "_read_ssm_parameters", lambda *_: {"secret-key": "k" * 32})
    monkeypatch.setenv("MAOF_SECRETS_SSM_PATH", "/maof/dev")
    assert load_settings().jwt_secret == ""


def test_prod_refuses_an_empty_jwt_secret(prod: pytest.MonkeyPatch) -> None:
    prod.setenv("MAOF_JWT_SECRET", "")
    refusal("MAOF_JWT_SECRET")


@pytest.mark.parametrize("length", [1, 16, 31])
def test_prod_refuses_a_jwt_secret_shorter_than_32_characters(
    prod: pytest.MonkeyPatch, length: int
) -> None:
    secret = "Zx9#" * 8
    prod.setenv("MAOF_JWT_SECRET", secret[:length])
    message = refusal("MAOF_JWT_SECRET")
    assert "Zx9#" not in message


def test_prod_refuses_the_dev_jwt_secret(prod: pytest.MonkeyPatch) -> None:
    prod.setenv("MAOF_JWT_SECRET", DEV_JWT_SECRET)
    message = refusal("MAOF_JWT_SECRET")
    assert DEV_JWT_SECRET not in message


@pytest.mark.parametrize(
    "variable",
    [
        "MAOF_JWT_SECRET",
        "MAOF_JWT_PREVIOUS_SECRETS",
        "MAOF_SECRET_KEY",
        "MAOF_PREVIOUS_SECRET_KEYS",
    ],
)
@pytest.mark.parametrize("published", [DEV_JWT_SECRET, DEV_SECRET_KEY])
def test_prod_refuses_a_published_dev_secret_as_any_secret_or_key(
    prod: pytest.MonkeyPatch, variable: str, published: str
) -> None:
    """Both dev defaults are in this repository: as a JWT secret, current or previous,
    anyone could sign tokens; as a key, current or previous, read every agent token and
    callback secret. Only MAOF_JWT_SECRET was refused."""
    rotating = variable.removeprefix("MAOF_").startswith(("JWT_PREVIOUS", "PREVIOUS"))
    prod.setenv(variable, f"{'o' * 32},{published}" if rotating else published)
    message = refusal(f"^{variable} ")
    assert published not in message


def test_the_dev_stage_takes_the_dev_defaults_as_previous_secrets_and_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAOF_STAGE", "dev")
    monkeypatch.setenv("MAOF_JWT_PREVIOUS_SECRETS", DEV_JWT_SECRET)
    monkeypatch.setenv("MAOF_PREVIOUS_SECRET_KEYS", DEV_SECRET_KEY)
    settings = load_settings()
    assert settings.jwt_previous_secrets == (DEV_JWT_SECRET,)
    assert settings.previous_secret_keys == (DEV_SECRET_KEY,)


def test_any_stage_but_dev_and_test_is_held_to_the_prod_rules(prod: pytest.MonkeyPatch) -> None:
    prod.setenv("MAOF_STAGE", "staging")
    prod.delenv("MAOF_JWT_SECRET")
    refusal("MAOF_JWT_SECRET")


def test_prod_refuses_a_short_secret_key(prod: pytest.MonkeyPatch) -> None:
    prod.setenv("MAOF_SECRET_KEY", "k" * 31)
    refusal("MAOF_SECRET_KEY")


def test_prod_refuses_a_missing_secret_key(prod: pytest.MonkeyPatch) -> None:
    prod.delenv("MAOF_SECRET_KEY")
    refusal("MAOF_SECRET_KEY must be at least 32 characters")


def test_a_function_reading_only_some_ssm_parameters_needs_no_secret_key(
    prod: pytest.MonkeyPatch,
) -> None:
    """MAOF_SECRETS_SSM_NAMES narrows what a function reads (never to a token secret it
    may not read); without secret-key among them, it starts without one."""
    asked: list[object] = []

    def read(*args: object) -> dict[str, str]:
        asked.append(args[5])  # the names it reads (MAOF_SECRETS_SSM_NAMES)
        return {"database-url": PROD_ENV["MAOF_DATABASE_URL"]}

    prod.setattr(config, "_read_ssm_parameters", read)
    prod.delenv("MAOF_SECRET_KEY")
    prod.delenv("MAOF_JWT_SECRET")
    prod.setenv("MAOF_SECRETS_SSM_PATH", "/maof/prod")
    prod.setenv("MAOF_SECRETS_SSM_NAMES", "database-url, redis-url")
    assert load_settings().secret_key == ""
    assert asked == [("database-url", "redis-url")]
    only = ("database-url", "redis-url")
    assert config.ssm_names(token_issuer=False, migrator=False, only=only) == list(only)
    assert config.ssm_names(token_issuer=False, migrator=False, only=["jwt-secret"]) == []
    prod.setenv("MAOF_SECRETS_SSM_NAMES", "database-url,secret-key")
    refusal("/maof/prod/secret-key is missing")
    prod.setenv("MAOF_SECRETS_SSM_NAMES", "database-url,secret-kye")
    refusal("MAOF_SECRETS_SSM_NAMES names no SSM parameter MAOF reads: 'secret-kye'")


def test_prod_refuses_a_missing_database_url(prod: pytest.MonkeyPatch) -> None:
    prod.delenv("MAOF_DATABASE_URL")
    refusal("MAOF_DATABASE_URL")


@pytest.mark.parametrize(
    "url",
    [
        "mysql://maof:hunter2@db.internal/maof",
        "sqlite:///maof.db",
        "postgresql+asyncpg://maof:hunter2@db.internal/maof",
        "db.internal:5432/maof",
    ],
)
def test_a_database_url_that_is_not_postgresql_is_refused(
    prod: pytest.MonkeyPatch, url: str
) -> None:
    prod.setenv("MAOF_DATABASE_URL", url)
    message = refusal("MAOF_DATABASE_URL")
    assert "hunter2" not in message


def test_dev_also_refuses_a_database_url_that_is_not_postgresql(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAOF_STAGE", "dev")
    monkeypatch.setenv("MAOF_DATABASE_URL", "sqlite:///maof.db")
    refusal("MAOF_DATABASE_URL")


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://maof:pw@db/maof?sslmode=require",
        "postgresql+psycopg://maof:pw@db/maof?sslmode=verify-full",
    ],
)
def test_postgresql_database_urls_are_accepted(prod: pytest.MonkeyPatch, url: str) -> None:
    prod.setenv("MAOF_DATABASE_URL", url)
    assert load_settings().database_url == url


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://maof:pw@db/maof",
        "postgresql://maof:pw@db/maof?sslmode=prefer",
        "postgresql://maof:pw@db/maof?sslmode=disable",
        "postgresql://maof:pw@db/maof?application_name=sslmode=require",
    ],
)
def test_prod_refuses_a_database_url_without_tls(prod: pytest.MonkeyPatch, url: str) -> None:
    prod.setenv("MAOF_DATABASE_URL", url)
    assert "MAOF_ALLOW_INSECURE_CONNECTIONS" in refusal("MAOF_DATABASE_URL must use TLS")


def test_prod_refuses_a_redis_url_without_tls(prod: pytest.MonkeyPatch) -> None:
    prod.setenv("MAOF_REDIS_URL", "redis://cache.internal:6379/0")
    refusal("MAOF_REDIS_URL must use TLS")


def test_insecure_connections_are_accepted_in_prod_only_when_explicitly_allowed(
    prod: pytest.MonkeyPatch,
) -> None:
    prod.setenv("MAOF_DATABASE_URL", "postgresql://maof:pw@db/maof")
    prod.setenv("MAOF_REDIS_URL", "redis://cache:6379/0")
    prod.setenv("MAOF_ALLOW_INSECURE_CONNECTIONS", "true")
    assert load_settings().redis_url == "redis://cache:6379/0"


def test_previous_keys_are_read_as_lists_and_must_be_long_enough(
    prod: pytest.MonkeyPatch,
) -> None:
    prod.setenv("MAOF_JWT_PREVIOUS_SECRETS", f"{'a' * 32}, {'b' * 40}")
    prod.setenv("MAOF_PREVIOUS_SECRET_KEYS", "c" * 32)
    settings = load_settings()
    assert settings.jwt_previous_secrets == ("a" * 32, "b" * 40)
    assert settings.previous_secret_keys == ("c" * 32,)
    prod.setenv("MAOF_JWT_PREVIOUS_SECRETS", "short")
    refusal("MAOF_JWT_PREVIOUS_SECRETS")


def test_admins_are_named_by_user_uuid(prod: pytest.MonkeyPatch) -> None:
    ops, root = uuid.uuid4(), uuid.uuid4()
    prod.setenv("MAOF_ADMIN_USER_UUIDS", f"{ops}, {str(root).upper()}")
    assert load_settings().admin_user_uuids == {ops, root}
    prod.setenv("MAOF_ADMIN_USER_UUIDS", "ops@example.com")
    assert "MAOF_ADMIN_USER_UUIDS" in refusal("MAOF_ADMIN_USER_UUIDS")


def test_prod_refuses_a_redis_url_that_is_not_redis(prod: pytest.MonkeyPatch) -> None:
    prod.setenv("MAOF_REDIS_URL", "http://cache.internal:6379")
    refusal("MAOF_REDIS_URL")


@pytest.mark.parametrize("value", ["abc", "9.5", "1e3", "", "15 minutes", "12\n3"])
def test_a_non_integer_access_token_ttl_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("MAOF_ACCESS_TOKEN_TTL_SECONDS", value)
    if value == "":  # unset and empty both mean "use the default"
        assert load_settings().access_token_ttl_seconds == 900
        return
    refusal("MAOF_ACCESS_TOKEN_TTL_SECONDS")


@pytest.mark.parametrize("value", ["0", "-5", "9", "86401"])
def test_an_access_token_ttl_out_of_range_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("MAOF_ACCESS_TOKEN_TTL_SECONDS", value)
    refusal("MAOF_ACCESS_TOKEN_TTL_SECONDS")


def test_an_integer_access_token_ttl_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAOF_ACCESS_TOKEN_TTL_SECONDS", "120")
    assert load_settings().access_token_ttl_seconds == 120


def test_a_non_number_failure_rate_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAOF_MOCK_AGENT_FAILURE_RATE", "often")
    refusal("MAOF_MOCK_AGENT_FAILURE_RATE")


def test_the_test_stage_gets_the_dev_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAOF_STAGE", "test")
    for name in ("MAOF_JWT_SECRET", "MAOF_SECRET_KEY", "MAOF_ACCESS_TOKEN_TTL_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.is_dev
    assert settings.jwt_secret == DEV_JWT_SECRET
    assert settings.access_token_ttl_seconds == 900
    assert settings.max_body_bytes == 1_000_000
    assert settings.aws_endpoint_url == "http://127.0.0.1:4566"


def test_load_settings_reads_the_environment_each_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAOF_MAX_BODY_BYTES", "2048")
    assert load_settings().max_body_bytes == 2048
    monkeypatch.setenv("MAOF_MAX_BODY_BYTES", "4096")
    assert load_settings().max_body_bytes == 4096


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", True),
        ("TRUE", True),
        ("yes", True),
        ("on", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
    ],
)
def test_booleans_accept_the_usual_spellings(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: bool
) -> None:
    monkeypatch.setenv("MAOF_MOCK_AGENTS", value)
    assert load_settings().mock_agents is expected


def test_a_boolean_that_is_neither_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAOF_MOCK_AGENTS", "maybe")
    assert "true or false" in refusal("MAOF_MOCK_AGENTS")


def test_a_number_out_of_range_is_refused_naming_both_bounds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAOF_POLLER_BATCH_SIZE", "11")
    assert "between 1 and 10" in refusal("MAOF_POLLER_BATCH_SIZE")


def test_the_largest_body_allowed_fits_the_lambda_event_that_carries_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Deployed, a request reaches the API function as a Lambda proxy event of at most
    6 MiB in which the body is a JSON string: a body of `\\"` at the old ceiling (6 MB) was
    12 MB of event, refused by API Gateway before MAOF could answer its own 413."""
    monkeypatch.setenv("MAOF_MAX_BODY_BYTES", "3000001")
    assert "between 1024 and 3000000" in refusal("MAOF_MAX_BODY_BYTES")
    monkeypatch.setenv("MAOF_MAX_BODY_BYTES", "3000000")
    ceiling = load_settings().max_body_bytes
    request = {"workflow": {"name": "n", "stages": []}, "input": ""}
    request["input"] = '"' * ((ceiling - len(json.dumps(request))) // 2)  # each `\\"`
    body = json.dumps(request)
    assert ceiling - 2 <= len(body) <= ceiling
    event = {
        "resource": "/workflows/execute",
        "path": "/workflows/execute",
        "httpMethod": "POST",
        # API Gateway's headers: at most 10 KB, in both forms.
        "headers": {"Authorization": "x" * 10_240},
        "multiValueHeaders": {"Authorization": ["x" * 10_240]},
        "queryStringParameters": None,
        "pathParameters": None,
        "requestContext": {"requestId": "x" * 36, "identity": {"sourceIp": "203.0.113.1"}},
        "body": body,
        "isBase64Encoded": False,
    }
    assert len(json.dumps(event)) < 6 * 1024 * 1024


def test_lists_are_comma_separated_and_blanks_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    ops, root = uuid.uuid4(), uuid.uuid4()
    monkeypatch.setenv("MAOF_ADMIN_USER_UUIDS", f" ,{ops},, {root} ,")
    assert load_settings().admin_user_uuids == {ops, root}
    monkeypatch.setenv("MAOF_JWT_PREVIOUS_SECRETS", f'["{"a" * 32}"]')  # not JSON
    assert load_settings().jwt_previous_secrets == (f'["{"a" * 32}"]',)


def test_a_short_previous_key_is_refused_without_showing_it(prod: pytest.MonkeyPatch) -> None:
    prod.setenv("MAOF_PREVIOUS_SECRET_KEYS", f"{'c' * 32},Zx9#short")
    assert "Zx9#" not in refusal("MAOF_PREVIOUS_SECRET_KEYS")


def test_the_log_level_is_one_that_logging_knows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAOF_LOG_LEVEL", "debug")
    assert load_settings().log_level == "DEBUG"
    monkeypatch.setenv("MAOF_LOG_LEVEL", "loud")
    refusal("MAOF_LOG_LEVEL")


def test_unknown_maof_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAOF_NO_SUCH_SETTING", "1")
    assert load_settings().stage == "dev"


def test_settings_cannot_be_changed_once_read() -> None:
    settings = load_settings()
    with pytest.raises(ValidationError):
        settings.stage = "prod"  # type: ignore[misc]


def test_the_region_is_lambdas_unless_maof_names_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_REGION", raising=False)
    assert load_settings().aws_region == "us-east-1"
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert load_settings().aws_region == "eu-west-1"
    monkeypatch.setenv("MAOF_AWS_REGION", "eu-central-1")
    assert load_settings().aws_region == "eu-central-1"


def test_the_migrations_connect_as_the_application_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings().migration_database_url == DEV_MIGRATION_DATABASE_URL
    url = "postgresql://maof:pw@db/maof"
    monkeypatch.setenv("MAOF_DATABASE_URL", url)
    assert load_settings().migration_database_url == url
    monkeypatch.setenv("MAOF_MIGRATION_DATABASE_URL", "postgresql://owner:pw@db/maof")
    assert load_settings().migration_database_url == "postgresql://owner:pw@db/maof"


def test_prod_migrations_refuse_an_owner_url_without_tls(prod: pytest.MonkeyPatch) -> None:
    from chalicelib.db.migrate import owner_engine

    prod.setenv("MAOF_MIGRATION_DATABASE_URL", "postgresql://owner:hunter2@db/maof")
    assert load_settings().migration_database_url  # only the migrate function uses it
    reset_settings()
    try:
        with pytest.raises(ConfigError) as caught:
            owner_engine()
    finally:
        reset_settings()
    message = str(caught.value)
    assert message.startswith("MAOF_MIGRATION_DATABASE_URL must use TLS")
    assert "hunter2" not in message and "\n" not in message


def test_the_idle_in_transaction_timeout_is_a_startup_option_unless_zero() -> None:
    assert db.connect_args(60)["options"] == (
        "-c idle_in_transaction_session_timeout=60000 -c tcp_keepalives_idle=30 "
        "-c tcp_keepalives_interval=10 -c tcp_keepalives_count=3"
    )
    assert db.connect_args(60)["keepalives_idle"] == db.connect_args(0)["keepalives_idle"] == 30
    # 0: none sent (a pooler that refuses startup options); the role's own setting applies.
    assert "options" not in db.connect_args(0)
    assert db.connect_args(0)["connect_timeout"] == 3


def test_the_apis_lock_and_statement_timeouts_are_startup_options_unless_zero() -> None:
    """Set for the API's connections alone (.chalice/config.json); the workers' and the
    migrations' statements are never cut."""
    assert db.connect_args(60, 5000, 15000)["options"].endswith(
        "-c tcp_keepalives_count=3 -c lock_timeout=5000 -c statement_timeout=15000"
    )
    assert db.connect_args(0, 5000, 0)["options"] == "-c lock_timeout=5000"
    assert db.connect_args(0, 0, 15000)["options"] == "-c statement_timeout=15000"
    assert "options" not in db.connect_args(0, 0, 0)
    assert load_settings().db_lock_timeout_ms == load_settings().db_statement_timeout_ms == 0


def test_the_agent_response_cap_leaves_room_for_the_envelope_around_the_largest_output(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both caps were 1 MB: an output within MAOF_STAGE_MAX_OUTPUT_BYTES, wrapped in the
    protocol's envelope, was over MAOF_AGENT_MAX_RESPONSE_BYTES (RESPONSE_TOO_LARGE)."""
    default = load_settings()
    assert default.agent_max_response_bytes == default.stage_max_output_bytes + 65_536
    monkeypatch.setenv("MAOF_STAGE_MAX_OUTPUT_BYTES", "2000000")
    assert load_settings().agent_max_response_bytes == 2_065_536
    monkeypatch.setenv("MAOF_STAGE_MAX_OUTPUT_BYTES", "50000000")
    assert load_settings().agent_max_response_bytes == 6_000_000  # its own ceiling
    monkeypatch.setenv("MAOF_AGENT_MAX_RESPONSE_BYTES", "6000000")
    assert load_settings().agent_max_response_bytes == 6_000_000  # set: as set
    monkeypatch.setenv("MAOF_STAGE_MAX_OUTPUT_BYTES", "5000")
    monkeypatch.setenv("MAOF_AGENT_MAX_RESPONSE_BYTES", "5000")
    assert load_settings().agent_max_response_bytes == 5000


def test_a_response_cap_below_the_output_cap_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer holds its output: with MAOF_AGENT_MAX_RESPONSE_BYTES below
    MAOF_STAGE_MAX_OUTPUT_BYTES, outputs within their cap failed as RESPONSE_TOO_LARGE."""
    monkeypatch.setenv("MAOF_STAGE_MAX_OUTPUT_BYTES", "5000000")
    monkeypatch.setenv("MAOF_AGENT_MAX_RESPONSE_BYTES", "1065536")
    message = refusal("MAOF_AGENT_MAX_RESPONSE_BYTES")
    assert "MAOF_STAGE_MAX_OUTPUT_BYTES (5000000" in message
    monkeypatch.setenv("MAOF_STAGE_MAX_OUTPUT_BYTES", "50000000")  # past the response ceiling
    monkeypatch.setenv("MAOF_AGENT_MAX_RESPONSE_BYTES", "5999999")
    refusal("MAOF_AGENT_MAX_RESPONSE_BYTES")


def test_a_copy_of_env_example_lets_the_response_cap_follow_the_output_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """docs/operations.md: copy .env.example to .env to override. It pinned the response
    cap, so raising the output cap in the copy left answers capped below it."""
    example = (ROOT / ".env.example").read_text()
    for name, value in re.findall(r"^(MAOF_[A-Z0-9_]+)=(.*)$", example, re.M):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MAOF_STAGE_MAX_OUTPUT_BYTES", "5000000")
    assert load_settings().agent_max_response_bytes == 5_065_536


@pytest.mark.parametrize("written", ["2000000", "2000000.0", " 2000000 "])
def test_an_unset_response_cap_follows_the_output_cap_however_settings_read_it(
    monkeypatch: pytest.MonkeyPatch, written: str
) -> None:
    """The output cap as Settings take it ("2000000.0" is 2000000): the response cap was
    left at its default, and start-up blamed MAOF_AGENT_MAX_RESPONSE_BYTES, never set."""
    monkeypatch.delenv("MAOF_AGENT_MAX_RESPONSE_BYTES", raising=False)
    monkeypatch.setenv("MAOF_STAGE_MAX_OUTPUT_BYTES", written)
    assert load_settings().agent_max_response_bytes == 2_065_536


@pytest.mark.parametrize("password", ["Tok3nSecret#x", "s3cr3tPart?rest"])
def test_a_redis_url_refused_never_shows_its_password(
    monkeypatch: pytest.MonkeyPatch, password: str
) -> None:
    """An AUTH token with # or ? written unescaped: redis-py's words quoted the token's first
    part ("Port could not be cast to integer value as 'Tok3nSecret'") into the logs."""
    monkeypatch.setenv("MAOF_REDIS_URL", f"rediss://default:{password}@cache.example:6379/0")
    message = refusal("MAOF_REDIS_URL")
    assert password.split("#")[0].split("?")[0] not in message, message


def test_the_default_agent_timeout_is_held_to_the_run_stage_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stage without timeoutMs gets MAOF_AGENT_TIMEOUT_MS: it must be one a stage could
    ask for, (MAOF_RUN_STAGE_TIMEOUT_SECONDS - 30) s at most, or the call is cut short of
    it by the invocation."""
    monkeypatch.setenv("MAOF_RUN_STAGE_TIMEOUT_SECONDS", "60")
    monkeypatch.setenv("MAOF_AGENT_TIMEOUT_MS", "30000")
    assert load_settings().agent_timeout_ms == 30_000 == load_settings().max_stage_timeout_ms
    monkeypatch.setenv("MAOF_AGENT_TIMEOUT_MS", "45000")
    message = refusal("MAOF_AGENT_TIMEOUT_MS")
    assert "MAOF_RUN_STAGE_TIMEOUT_SECONDS (60)" in message and "30000 ms" in message
    monkeypatch.delenv("MAOF_RUN_STAGE_TIMEOUT_SECONDS")  # 900 s, Lambda's most: 870 s
    assert load_settings().agent_timeout_ms == 45_000
    monkeypatch.setenv("MAOF_AGENT_TIMEOUT_MS", "900000")
    assert "between 100 and 870000" in refusal("MAOF_AGENT_TIMEOUT_MS")


def test_the_health_probe_timeout_leaves_a_registration_well_within_api_gateways_29_s(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Registering an agent waits up to CHECK_LOOKUP_SECONDS for its name, then probes it:
    at the 30 s once accepted, the request outlived API Gateway's 29 s (a 504 for an agent
    already stored, and the client's retry a 409)."""
    chalice = json.loads((ROOT / ".chalice" / "config.json").read_text())
    api_seconds = chalice["stages"]["prod"]["lambda_functions"]["api_handler"]["lambda_timeout"]
    longest = network.CHECK_LOOKUP_SECONDS + config.MAX_AGENT_HEALTH_TIMEOUT_MS / 1000
    assert longest <= api_seconds - 10  # the rest of the request: database, Redis, a cold start
    monkeypatch.setenv("MAOF_AGENT_HEALTH_TIMEOUT_MS", str(config.MAX_AGENT_HEALTH_TIMEOUT_MS))
    assert load_settings().agent_health_timeout_ms == 10_000
    monkeypatch.setenv("MAOF_AGENT_HEALTH_TIMEOUT_MS", "30000")
    assert "between 100 and 10000" in refusal("MAOF_AGENT_HEALTH_TIMEOUT_MS")


@pytest.mark.parametrize(
    ("url", "what"),
    [
        ("redis://127.0.0.1:63x9/15", "not a valid Redis URL"),  # each use a ValueError: 500s
        ("redis://127.0.0.1:6379/db13", "database by number"),  # redis-py would use db 0
        ("redis://127.0.0.1:6379/?db=x", "not a valid Redis URL"),
        ("redis://cache..internal:6379/0", "not a valid Redis URL"),  # refused at each connect
    ],
)
def test_a_malformed_redis_url_is_refused_at_start_up(
    monkeypatch: pytest.MonkeyPatch, url: str, what: str
) -> None:
    monkeypatch.setenv("MAOF_REDIS_URL", url)
    assert what in refusal("MAOF_REDIS_URL")


@pytest.mark.parametrize(
    "url", ["redis://h:6379", "redis://h:6379/", "redis://:p%2Fw@[::1]:6379/12", "rediss://h/3"]
)
def test_redis_urls_redis_py_reads_as_written_are_accepted(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("MAOF_REDIS_URL", url)
    assert load_settings().redis_url == url


def _start(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """`python <args>` in a fresh process, in the test stage with `env` added."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("MAOF_")}
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**inherited, "MAOF_STAGE": "test", "POWERTOOLS_METRICS_DISABLED": "true", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_bad_log_level_stops_start_up_with_one_line_not_a_traceback() -> None:
    """docs/operations.md: an invalid setting stops start-up with one line saying which.
    The Logger was given MAOF_LOG_LEVEL at import, and raised before Settings could."""
    loaded = _start(["-c", "import app"], MAOF_LOG_LEVEL="verbose")
    assert loaded.returncode == 0 and "Traceback" not in loaded.stderr, loaded.stderr[-600:]
    started = _start(["-m", "devstack.poller"], MAOF_LOG_LEVEL="verbose")
    assert started.returncode == 2, started.stderr[-600:]
    assert started.stderr.strip().splitlines() == [
        "maof: configuration error: MAOF_LOG_LEVEL must be one of 'CRITICAL', 'FATAL', "
        "'ERROR', 'WARNING', 'WARN', 'INFO', 'DEBUG' or 'NOTSET', got 'VERBOSE'"
    ]


@pytest.mark.parametrize(
    "variable", ["MAOF_AGENT_HEALTH_INTERVAL_SECONDS", "MAOF_AUDIT_CHECKPOINT_INTERVAL_SECONDS"]
)
def test_an_interval_the_settings_accept_also_loads_the_app(variable: str) -> None:
    """The schedules are bound at import from the raw value: int('120.0') raised there,
    although Settings read it as 120 (pydantic's lax int)."""
    script = (
        "import app\n"
        "from chalicelib.engine import handlers\n"
        "print(handlers.HEALTH_CHECK_RATE_MINUTES, handlers.CHECKPOINT_RATE_MINUTES)\n"
    )
    loaded = _start(["-c", script], **{variable: "120.0"})
    assert loaded.returncode == 0, loaded.stderr[-600:]
    expected = "2 1" if variable == "MAOF_AGENT_HEALTH_INTERVAL_SECONDS" else "1 2"
    assert loaded.stdout.split() == expected.split()


def test_an_interval_the_settings_refuse_is_refused_at_import_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAOF_AUDIT_CHECKPOINT_INTERVAL_SECONDS", "120.0")
    assert config.import_time_int("audit_checkpoint_interval_seconds") == 120
    monkeypatch.setenv("MAOF_AUDIT_CHECKPOINT_INTERVAL_SECONDS", "2 minutes")
    with pytest.raises(ConfigError) as refused:
        config.import_time_int("audit_checkpoint_interval_seconds")
    assert str(refused.value) == (
        "MAOF_AUDIT_CHECKPOINT_INTERVAL_SECONDS must be a whole number, got '2 minutes'"
    )


@pytest.mark.parametrize("field", ["MAOF_DATABASE_URL", "MAOF_MIGRATION_DATABASE_URL"])
@pytest.mark.parametrize(
    ("port", "what"), [("54x2", "not a URL SQLAlchemy can read"), ("99999", "1 and 65535")]
)
def test_a_database_url_with_a_bad_port_is_refused_without_showing_it(
    monkeypatch: pytest.MonkeyPatch, field: str, port: str, what: str
) -> None:
    """It passed the postgresql:// check, then SQLAlchemy's URL parser raised at start-up."""
    monkeypatch.setenv(field, f"postgresql+psycopg://maof:hunter2@127.0.0.1:{port}/maof")
    message = refusal(field)
    assert what in message and "hunter2" not in message


def test_the_api_stops_with_one_line_when_the_database_does_not_answer() -> None:
    started = _start(
        ["-m", "devstack.api", "--port", "1"],
        MAOF_DATABASE_URL="postgresql+psycopg://maof:hunter2@127.0.0.1:1/maof",
    )
    assert started.returncode == 2, started.stderr[-600:]
    lines = started.stderr.strip().splitlines()
    assert len(lines) == 1 and "hunter2" not in lines[0], lines
    assert lines[0].startswith("maof: cannot connect to MAOF_DATABASE_URL: "), lines


@pytest.mark.parametrize("stage", ["development", "Dev", "prod"])
def test_a_required_url_left_unset_outside_dev_and_test_is_named_as_required(
    monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    """A typo'd MAOF_STAGE with nothing else set (as dev needs) was told 'MAOF_DATABASE_URL
    must be a postgresql:// URL', about a URL it never set."""
    monkeypatch.setenv("MAOF_STAGE", stage)
    message = refusal("MAOF_DATABASE_URL")
    assert message == (
        f"MAOF_DATABASE_URL is required in stage {stage!r} (only dev and test have defaults)"
    )
    monkeypatch.setenv("MAOF_DATABASE_URL", PROD_ENV["MAOF_DATABASE_URL"])
    assert refusal("MAOF_REDIS_URL").startswith("MAOF_REDIS_URL is required in stage")
