"""Settings from MAOF_* environment variables, validated once per process.

Deployed stages keep their secrets out of the environment: when MAOF_SECRETS_SSM_PATH is
set, the JWT secret, the secret key and (when present) the database and Redis URLs are
read from SSM Parameter Store under that path, decrypted, once per process (one
GetParameters call at cold start), before anything is validated.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import TypeVar

DEV_JWT_SECRET = "dev-only-secret-change-me-0123456789abcdef"  # noqa: S105 (dev stage only; refused elsewhere)
DEV_SECRET_KEY = "dev-only-key-for-agent-tokens-0123456789"  # noqa: S105 (dev stage only)


# Of the run_stage function's time, what a stage's agent call may never use: enough to
# store the outcome and send the next messages after the call returns or times out.
STAGE_TIMEOUT_MARGIN_SECONDS = 30


class ConfigError(Exception):
    """A required setting is missing or invalid; the message is one line."""


# SSM parameter names under MAOF_SECRETS_SSM_PATH and the setting each one supplies.
SSM_SECRETS = {
    "jwt-secret": "MAOF_JWT_SECRET",
    "secret-key": "MAOF_SECRET_KEY",
    "database-url": "MAOF_DATABASE_URL",
    "redis-url": "MAOF_REDIS_URL",
}
# Keys being rotated out (comma-separated), present only during a rotation.
SSM_PREVIOUS_KEYS = {
    "jwt-previous-secrets": "MAOF_JWT_PREVIOUS_SECRETS",
    "previous-secret-keys": "MAOF_PREVIOUS_SECRET_KEYS",
}
# Without these two under the path, start-up stops; the URLs may come from the environment.
SSM_REQUIRED = ("jwt-secret", "secret-key")
LOCALSTACK_ENDPOINT = "http://127.0.0.1:4566"


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


@functools.lru_cache(maxsize=4)
def _read_ssm_parameters(path: str, region: str, endpoint: str | None) -> dict[str, str]:
    """The decrypted values of the SSM_SECRETS parameters that exist under `path`, by name."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    kwargs: dict[str, object] = {
        "region_name": region,
        # A Lambda in a VPC without a route to SSM must fail in seconds, not hang.
        "config": Config(
            connect_timeout=2, read_timeout=5, retries={"max_attempts": 3, "mode": "standard"}
        ),
    }
    if endpoint:
        # LocalStack accepts any credentials; don't require real ones locally.
        kwargs.update(
            endpoint_url=endpoint,
            aws_access_key_id="test",
            aws_secret_access_key="test",  # noqa: S106
        )
    names = [f"{path}/{name}" for name in (*SSM_SECRETS, *SSM_PREVIOUS_KEYS)]
    try:
        ssm = boto3.session.Session().client("ssm", **kwargs)
        found = ssm.get_parameters(Names=names, WithDecryption=True)["Parameters"]
    except (BotoCoreError, ClientError) as exc:
        raise ConfigError(
            f"could not read the SSM parameters under MAOF_SECRETS_SSM_PATH={path}: {_one_line(exc)}"
        ) from None
    return {item["Name"][len(path) + 1 :]: str(item["Value"]) for item in found}


def _ssm_hint(name: str) -> str:
    path = (os.environ.get("MAOF_SECRETS_SSM_PATH") or "").rstrip("/")
    return f" (or the SSM parameter {path}/{name})" if path else ""


def _ssm_secrets() -> dict[str, str]:
    """The settings supplied by SSM Parameter Store (empty when MAOF_SECRETS_SSM_PATH is unset)."""
    raw_path = os.environ.get("MAOF_SECRETS_SSM_PATH")
    if not raw_path:
        return {}
    path = raw_path.rstrip("/")
    if not path.startswith("/") or len(path) < 2 or any(ch.isspace() for ch in path):
        raise ConfigError(
            f"MAOF_SECRETS_SSM_PATH must be an SSM path such as /maof/prod, got {raw_path!r}"
        )
    is_dev = _str("MAOF_STAGE", "dev") in ("dev", "test")
    endpoint = _optional("MAOF_AWS_ENDPOINT_URL") or (LOCALSTACK_ENDPOINT if is_dev else None)
    region = _str("MAOF_AWS_REGION", os.environ.get("AWS_REGION", "us-east-1"))
    values = _read_ssm_parameters(path, region, endpoint)
    missing = [f"{path}/{name}" for name in SSM_REQUIRED if not values.get(name)]
    if missing:
        raise ConfigError(
            f"SSM parameter {missing[0]} is missing or empty (MAOF_SECRETS_SSM_PATH={path}); "
            "create it as a SecureString"
        )
    settings = {**SSM_SECRETS, **SSM_PREVIOUS_KEYS}
    return {settings[name]: value for name, value in values.items() if value}


N = TypeVar("N", int, float)


def _number(name: str, default: N, low: N, high: N, kind: type[N], what: str) -> N:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name} must be {what}, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _int(name: str, default: int, low: int, high: int) -> int:
    return _number(name, default, low, high, int, "a whole number")


def _float(name: str, default: float, low: float, high: float) -> float:
    return _number(name, default, low, high, float, "a number")


def _str(name: str, default: str) -> str:
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def _optional(name: str) -> str | None:
    value = os.environ.get(name)
    return value or None


def _list(name: str, ssm: dict[str, str]) -> tuple[str, ...]:
    """A comma-separated setting (from SSM when there), without blanks."""
    raw = ssm.get(name) or os.environ.get(name) or ""
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


@dataclass(frozen=True)
class Settings:
    """Every setting MAOF reads; `.env.example` documents each one."""

    stage: str
    database_url: str
    redis_url: str
    jwt_secret: str
    jwt_previous_secrets: tuple[str, ...]
    secret_key: str
    previous_secret_keys: tuple[str, ...]
    admin_emails: frozenset[str]
    aws_region: str
    aws_endpoint_url: str | None
    stage_queue_name: str
    stage_queue_url: str | None
    dashboard_bucket: str
    cors_origin: str
    access_token_ttl_seconds: int
    refresh_token_ttl_seconds: int
    session_max_lifetime_seconds: int
    max_body_bytes: int
    max_json_depth: int
    log_level: str
    mock_agent_delay_ms: int
    mock_agent_failure_rate: float
    stage_lease_seconds: int
    sweep_queued_after_seconds: int
    sweep_backlog_after_seconds: int
    sweep_interval_seconds: int
    stage_max_lease_expiries: int
    stage_max_requeues: int
    stage_max_waits: int
    stage_max_input_bytes: int
    stage_max_output_bytes: int
    run_max_output_bytes: int
    agent_max_output_depth: int
    run_stage_timeout_seconds: int
    poller_concurrency: int
    poller_batch_size: int
    poller_wait_seconds: int
    db_pool_size: int
    db_max_overflow: int
    agent_cache_ttl_seconds: int
    mock_agents: bool
    agent_timeout_ms: int
    agent_retries: int
    agent_backoff_ms: int
    agent_max_backoff_ms: int
    agent_max_response_bytes: int
    agent_health_timeout_ms: int
    agent_health_interval_seconds: int
    allow_private_agent_endpoints: bool
    login_attempts_per_minute: int
    login_attempts_per_ip_per_minute: int
    submissions_per_minute: int
    max_active_runs: int

    @property
    def is_dev(self) -> bool:
        return self.stage in ("dev", "test")

    @property
    def max_stage_timeout_ms(self) -> int:
        """The longest `timeoutMs` a stage may ask for: what the run_stage function can wait,
        less a margin to record the outcome (STAGE_TIMEOUT_MARGIN_SECONDS)."""
        return (self.run_stage_timeout_seconds - STAGE_TIMEOUT_MARGIN_SECONDS) * 1000


def load_settings() -> Settings:
    """Read and validate the environment; raise ConfigError with one line."""
    stage = _str("MAOF_STAGE", "dev")
    is_dev = stage in ("dev", "test")
    # A parameter under MAOF_SECRETS_SSM_PATH wins over the same setting in the environment.
    ssm = _ssm_secrets()
    jwt_secret = ssm.get("MAOF_JWT_SECRET") or _str(
        "MAOF_JWT_SECRET", DEV_JWT_SECRET if is_dev else ""
    )
    if not is_dev and len(jwt_secret) < 32:
        raise ConfigError(f"MAOF_JWT_SECRET must be at least 32 characters in stage {stage!r}")
    if not is_dev and jwt_secret == DEV_JWT_SECRET:
        raise ConfigError(f"MAOF_JWT_SECRET must not be the dev default in stage {stage!r}")
    secret_key = ssm.get("MAOF_SECRET_KEY") or _str(
        "MAOF_SECRET_KEY", DEV_SECRET_KEY if is_dev else ""
    )
    if len(secret_key) < 32:
        raise ConfigError(f"MAOF_SECRET_KEY must be at least 32 characters in stage {stage!r}")
    # Keys being rotated out: still accepted to verify (JWTs) or decrypt (agent tokens).
    jwt_previous = _list("MAOF_JWT_PREVIOUS_SECRETS", ssm)
    previous_keys = _list("MAOF_PREVIOUS_SECRET_KEYS", ssm)
    for name, values in (
        ("MAOF_JWT_PREVIOUS_SECRETS", jwt_previous),
        ("MAOF_PREVIOUS_SECRET_KEYS", previous_keys),
    ):
        if any(len(value) < 32 for value in values):
            raise ConfigError(f"every key in {name} must be at least 32 characters")
    database_url = ssm.get("MAOF_DATABASE_URL") or _str(
        "MAOF_DATABASE_URL",
        "postgresql+psycopg://maof:maof@127.0.0.1:5432/maof" if is_dev else "",
    )
    if not database_url.startswith(("postgresql://", "postgresql+psycopg://")):
        raise ConfigError(
            "MAOF_DATABASE_URL must be a postgresql:// URL" + _ssm_hint("database-url")
        )
    redis_url = ssm.get("MAOF_REDIS_URL") or _str(
        "MAOF_REDIS_URL", "redis://127.0.0.1:6379/0" if is_dev else ""
    )
    if not redis_url.startswith(("redis://", "rediss://")):
        raise ConfigError(
            "MAOF_REDIS_URL must be a redis:// or rediss:// URL" + _ssm_hint("redis-url")
        )
    if not is_dev and not _bool("MAOF_ALLOW_INSECURE_CONNECTIONS", False):
        _require_tls(database_url, redis_url)
    return Settings(
        stage=stage,
        database_url=database_url,
        redis_url=redis_url,
        jwt_secret=jwt_secret,
        jwt_previous_secrets=jwt_previous,
        secret_key=secret_key,
        previous_secret_keys=previous_keys,
        admin_emails=frozenset(e.lower() for e in _list("MAOF_ADMIN_EMAILS", {})),
        aws_region=_str("MAOF_AWS_REGION", os.environ.get("AWS_REGION", "us-east-1")),
        aws_endpoint_url=_optional("MAOF_AWS_ENDPOINT_URL")
        or (LOCALSTACK_ENDPOINT if is_dev else None),
        stage_queue_name=_str("MAOF_STAGE_QUEUE_NAME", "maof-stage-queue"),
        stage_queue_url=_optional("MAOF_STAGE_QUEUE_URL"),
        dashboard_bucket=_str("MAOF_DASHBOARD_BUCKET", "maof-dashboard"),
        cors_origin=_str("MAOF_CORS_ORIGIN", "*"),
        access_token_ttl_seconds=_int("MAOF_ACCESS_TOKEN_TTL_SECONDS", 900, 10, 86400),
        refresh_token_ttl_seconds=_int("MAOF_REFRESH_TOKEN_TTL_SECONDS", 7 * 86400, 60, 90 * 86400),
        session_max_lifetime_seconds=_int(
            "MAOF_SESSION_MAX_LIFETIME_SECONDS", 30 * 86400, 60, 365 * 86400
        ),
        max_body_bytes=_int("MAOF_MAX_BODY_BYTES", 1_000_000, 1024, 6_000_000),
        max_json_depth=_int("MAOF_MAX_JSON_DEPTH", 64, 4, 512),
        log_level=_str("MAOF_LOG_LEVEL", "INFO").upper(),
        mock_agent_delay_ms=_int("MAOF_MOCK_AGENT_DELAY_MS", 0, 0, 600_000),
        mock_agent_failure_rate=_float("MAOF_MOCK_AGENT_FAILURE_RATE", 0.0, 0.0, 1.0),
        # Why these values: README "How a run heals itself" (a dead worker's stage runs
        # again within lease + interval; a lost message within queued-after + interval).
        stage_lease_seconds=_int("MAOF_STAGE_LEASE_SECONDS", 15, 3, 3600),
        sweep_queued_after_seconds=_int("MAOF_SWEEP_QUEUED_AFTER_SECONDS", 10, 0, 86400),
        sweep_backlog_after_seconds=_int("MAOF_SWEEP_BACKLOG_AFTER_SECONDS", 300, 0, 86400),
        sweep_interval_seconds=_int("MAOF_SWEEP_INTERVAL_SECONDS", 5, 1, 86400),
        stage_max_lease_expiries=_int("MAOF_STAGE_MAX_LEASE_EXPIRIES", 3, 0, 1000),
        stage_max_requeues=_int("MAOF_STAGE_MAX_REQUEUES", 10, 0, 10_000),
        stage_max_waits=_int("MAOF_STAGE_MAX_WAITS", 500, 0, 1_000_000),
        stage_max_input_bytes=_int("MAOF_STAGE_MAX_INPUT_BYTES", 1_000_000, 1024, 100_000_000),
        stage_max_output_bytes=_int("MAOF_STAGE_MAX_OUTPUT_BYTES", 1_000_000, 1024, 100_000_000),
        run_max_output_bytes=_int("MAOF_RUN_MAX_OUTPUT_BYTES", 20_000_000, 1024, 10_000_000_000),
        agent_max_output_depth=_int("MAOF_AGENT_MAX_OUTPUT_DEPTH", 100, 4, 1000),
        run_stage_timeout_seconds=_int("MAOF_RUN_STAGE_TIMEOUT_SECONDS", 900, 60, 900),
        poller_concurrency=_int("MAOF_POLLER_CONCURRENCY", 16, 1, 64),
        poller_batch_size=_int("MAOF_POLLER_BATCH_SIZE", 10, 1, 10),
        poller_wait_seconds=_int("MAOF_POLLER_WAIT_SECONDS", 1, 0, 20),
        db_pool_size=_int("MAOF_DB_POOL_SIZE", 10, 1, 100),
        db_max_overflow=_int("MAOF_DB_MAX_OVERFLOW", 10, 0, 100),
        agent_cache_ttl_seconds=_int("MAOF_AGENT_CACHE_TTL_SECONDS", 30, 0, 3600),
        mock_agents=_bool("MAOF_MOCK_AGENTS", False),
        agent_timeout_ms=_int("MAOF_AGENT_TIMEOUT_MS", 30_000, 100, 900_000),
        agent_retries=_int("MAOF_AGENT_RETRIES", 2, 0, 10),
        agent_backoff_ms=_int("MAOF_AGENT_BACKOFF_MS", 1000, 0, 3_600_000),
        agent_max_backoff_ms=_int("MAOF_AGENT_MAX_BACKOFF_MS", 60_000, 0, 86_400_000),
        agent_max_response_bytes=_int("MAOF_AGENT_MAX_RESPONSE_BYTES", 1_000_000, 1024, 6_000_000),
        agent_health_timeout_ms=_int("MAOF_AGENT_HEALTH_TIMEOUT_MS", 2000, 100, 30_000),
        agent_health_interval_seconds=_int("MAOF_AGENT_HEALTH_INTERVAL_SECONDS", 60, 5, 86400),
        allow_private_agent_endpoints=_bool("MAOF_ALLOW_PRIVATE_AGENT_ENDPOINTS", False),
        login_attempts_per_minute=_int("MAOF_LOGIN_ATTEMPTS_PER_MINUTE", 10, 1, 10_000),
        login_attempts_per_ip_per_minute=_int(
            "MAOF_LOGIN_ATTEMPTS_PER_IP_PER_MINUTE", 60, 1, 1_000_000
        ),
        submissions_per_minute=_int("MAOF_SUBMISSIONS_PER_MINUTE", 300, 1, 1_000_000),
        max_active_runs=_int("MAOF_MAX_ACTIVE_RUNS", 500, 1, 1_000_000),
    )


def _require_tls(database_url: str, redis_url: str) -> None:
    """Outside dev, credentials and data must not cross the network in clear text."""
    from urllib.parse import parse_qs, urlparse

    sslmode = parse_qs(urlparse(database_url).query).get("sslmode", [""])[-1]
    if sslmode not in ("require", "verify-ca", "verify-full"):
        raise ConfigError(
            "MAOF_DATABASE_URL must use TLS (?sslmode=require or verify-full)"
            + _ssm_hint("database-url")
            + "; MAOF_ALLOW_INSECURE_CONNECTIONS=true overrides"
        )
    if not redis_url.startswith("rediss://"):
        raise ConfigError(
            "MAOF_REDIS_URL must use TLS (rediss://)"
            + _ssm_hint("redis-url")
            + "; MAOF_ALLOW_INSECURE_CONNECTIONS=true overrides"
        )


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read on first use."""
    return load_settings()


def reset_settings() -> None:
    """Forget cached settings and SSM parameters (tests change the environment)."""
    get_settings.cache_clear()
    _read_ssm_parameters.cache_clear()
