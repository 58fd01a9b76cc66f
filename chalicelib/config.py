"""Settings from MAOF_* environment variables, validated once per process (pydantic-settings).

Deployed stages keep their secrets out of the environment: when MAOF_SECRETS_SSM_PATH is
set, the JWT secret, the secret key and (when present) the database and Redis URLs are
read from SSM Parameter Store under that path, decrypted, once per process (one
GetParameters call at cold start), and win over the same settings in the environment.
Each function reads only the ones it uses (ssm_names), which its role alone may read.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Collection
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AliasChoices,
    BeforeValidator,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ENV_PREFIX = "MAOF_"
DEV_STAGES = ("dev", "test")
DEV_JWT_SECRET = "dev-only-secret-change-me-0123456789abcdef"  # noqa: S105 (dev stage only; refused elsewhere)
DEV_SECRET_KEY = "dev-only-key-for-agent-tokens-0123456789"  # noqa: S105 (dev stage only)
DEV_SECRETS = (DEV_JWT_SECRET, DEV_SECRET_KEY)  # refused as any secret or key elsewhere
LOCALSTACK_ENDPOINT = "http://127.0.0.1:4566"
# The local stack's two roles: the application's (INSERT and SELECT only on the audit
# trail) and the owner's, which runs the migrations (chalicelib/db/roles.py).
DEV_DATABASE_URL = "postgresql+psycopg://maof_app:maof_app@127.0.0.1:5432/maof"
DEV_MIGRATION_DATABASE_URL = "postgresql+psycopg://maof:maof@127.0.0.1:5432/maof"
# What the dev and test stages use for these when unset; elsewhere they have no default.
DEV_DEFAULTS = {
    "jwt_secret": DEV_JWT_SECRET,
    "secret_key": DEV_SECRET_KEY,
    "database_url": DEV_DATABASE_URL,
    "migration_database_url": DEV_MIGRATION_DATABASE_URL,
    "redis_url": "redis://127.0.0.1:6379/0",
    "aws_endpoint_url": LOCALSTACK_ENDPOINT,
}
PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Of the run_stage function's time, what a stage's agent call may never use: enough to
# store the outcome and send the next messages after the call returns or times out.
STAGE_TIMEOUT_MARGIN_SECONDS = 30
# The longest stage timeout any run_stage function allows: Lambda's 900 s, less the margin.
MAX_STAGE_TIMEOUT_MS = (900 - STAGE_TIMEOUT_MARGIN_SECONDS) * 1000
# Unset, MAOF_AGENT_MAX_RESPONSE_BYTES is MAOF_STAGE_MAX_OUTPUT_BYTES and this, for the
# protocol's envelope around the output (at most the response cap's own ceiling): with
# both at 1 MB, an output within its cap could not be answered at all.
RESPONSE_ENVELOPE_BYTES = 65_536
MAX_AGENT_RESPONSE_BYTES = 6_000_000
# A registration waits up to 5 s for the endpoint's name, then probes it: with this, at
# most 15 s, well within API Gateway's 29 s (past it a 504, for an agent already stored:
# the client's retry is a 409).
MAX_AGENT_HEALTH_TIMEOUT_MS = 10_000

# SSM parameter names under MAOF_SECRETS_SSM_PATH and the setting each one supplies.
SSM_SECRETS = {
    "jwt-secret": "MAOF_JWT_SECRET",
    "secret-key": "MAOF_SECRET_KEY",
    "database-url": "MAOF_DATABASE_URL",
    "redis-url": "MAOF_REDIS_URL",
    "audit-signing-key": "MAOF_AUDIT_SIGNING_KEYS",
}
# Read only by the migrate function (MAOF_MIGRATOR=true): the database owner's URL. The
# other functions connect as the application role, which cannot rewrite the audit trail.
SSM_MIGRATION_SECRETS = {"migration-database-url": "MAOF_MIGRATION_DATABASE_URL"}
# Keys being rotated out (comma-separated), present only during a rotation.
SSM_PREVIOUS_KEYS = {
    "jwt-previous-secrets": "MAOF_JWT_PREVIOUS_SECRETS",
    "previous-secret-keys": "MAOF_PREVIOUS_SECRET_KEYS",
}
# Read only by the API function (MAOF_TOKEN_ISSUER=true), the one that signs and checks
# the users' tokens: no other function's role may read them, so none can mint a token.
SSM_TOKEN_SECRETS = ("jwt-secret", "jwt-previous-secrets")
# Without these under the path, start-up stops if the function reads them; the URLs may
# come from the environment.
SSM_REQUIRED = ("jwt-secret", "secret-key")
# The SSM parameter of each setting (field) it may supply.
_SSM_PARAMETERS = {
    variable.removeprefix(ENV_PREFIX).lower(): name
    for name, variable in {**SSM_SECRETS, **SSM_PREVIOUS_KEYS, **SSM_MIGRATION_SECRETS}.items()
}


class ConfigError(Exception):
    """A required setting is missing or invalid; the message is one line."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _comma_separated(value: object) -> object:
    """'a, b,,c' is ('a', 'b', 'c'): a list setting is comma-separated, never JSON."""
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    return value


# Keys being rotated out: each as long as a current one must be.
PreviousKeys = Annotated[
    tuple[Annotated[str, Field(min_length=32)], ...],
    NoDecode,
    BeforeValidator(_comma_separated),
]
Uuids = Annotated[frozenset[uuid.UUID], NoDecode, BeforeValidator(_comma_separated)]
Names = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_comma_separated)]


class _Bootstrap(BaseSettings):
    """The settings read before the secrets, from the environment alone: the stage, and
    where its secrets are."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="ignore", frozen=True
    )

    # dev | test | anything else, which is held to the production rules.
    stage: str = "dev"
    # Deployed: where the secrets are in SSM Parameter Store, e.g. /maof/prod.
    secrets_ssm_path: str | None = None
    # Set on the migrate function alone: it also reads SSM's migration-database-url.
    migrator: bool = False
    # Set on the API function alone: it alone reads SSM's jwt-secret (SSM_TOKEN_SECRETS).
    token_issuer: bool = False
    # Set on the functions that need fewer secrets than the others (.chalice/config.json):
    # the only parameters under the path they read (ssm_names).
    secrets_ssm_names: Names | None = None
    aws_region: str = Field(
        "us-east-1", validation_alias=AliasChoices("MAOF_AWS_REGION", "AWS_REGION")
    )
    # Unset in AWS: the real endpoints.
    aws_endpoint_url: str | None = None

    @property
    def is_dev(self) -> bool:
        return self.stage in DEV_STAGES

    @model_validator(mode="before")
    @classmethod
    def _dev_defaults(cls, data: dict[str, Any]) -> dict[str, Any]:
        """DEV_DEFAULTS for what the dev and test stages leave unset (Settings' fields too).
        Unset anywhere, the migrations connect as the application: one role for both,
        which can then rewrite history."""
        defaults: dict[str, Any] = {}
        if data.get("stage", cls.model_fields["stage"].default) in DEV_STAGES:
            defaults = dict(DEV_DEFAULTS)
            if data.get("secrets_ssm_path"):  # never the published dev keys: SSM's or none
                defaults.pop("jwt_secret")
                defaults.pop("secret_key")
        if "database_url" in data:
            defaults["migration_database_url"] = data["database_url"]
        return {**defaults, **data}

    @model_validator(mode="before")
    @classmethod
    def _response_cap_after_the_output_cap(cls, data: dict[str, Any]) -> dict[str, Any]:
        """An unset response cap follows the output cap (RESPONSE_ENVELOPE_BYTES)."""
        if "agent_max_response_bytes" in data or "stage_max_output_bytes" not in data:
            return data
        try:  # read as the field reads it ("2000000.0" too)
            output_cap = TypeAdapter(int).validate_python(data["stage_max_output_bytes"])
        except ValidationError:
            return data  # refused as the output cap's own error
        cap = min(max(output_cap + RESPONSE_ENVELOPE_BYTES, 1024), MAX_AGENT_RESPONSE_BYTES)
        return {**data, "agent_max_response_bytes": cap}

    @field_validator("secrets_ssm_path")
    @classmethod
    def _an_ssm_path(cls, raw: str | None) -> str | None:
        path = raw.rstrip("/") if raw is not None else None
        if path is not None and (not path.startswith("/") or any(c.isspace() for c in path)):
            raise ValueError(f"must be an SSM path such as /maof/prod, got {raw!r}")
        return path

    @field_validator("secrets_ssm_names")
    @classmethod
    def _known_names(cls, names: tuple[str, ...] | None) -> tuple[str, ...] | None:
        known = {*SSM_SECRETS, *SSM_PREVIOUS_KEYS, *SSM_MIGRATION_SECRETS}
        if names is not None and (unknown := [name for name in names if name not in known]):
            raise ValueError(f"names no SSM parameter MAOF reads: {unknown[0]!r}")
        return names

    @property
    def ssm_parameter_names(self) -> list[str]:
        """The parameters under MAOF_SECRETS_SSM_PATH this function reads."""
        return ssm_names(
            token_issuer=self.token_issuer, migrator=self.migrator, only=self.secrets_ssm_names
        )


def ssm_names(
    *, token_issuer: bool, migrator: bool, only: Collection[str] | None = None
) -> list[str]:
    """The SSM parameters a function reads (its role may read these and no others): all but
    the token and migration ones unless it is the token issuer or the migrator, and of
    those only the ones in `only` (its MAOF_SECRETS_SSM_NAMES) when given."""
    names = [*SSM_SECRETS, *SSM_PREVIOUS_KEYS, *(SSM_MIGRATION_SECRETS if migrator else ())]
    return [
        name
        for name in names
        if (token_issuer or name not in SSM_TOKEN_SECRETS) and (only is None or name in only)
    ]


@functools.lru_cache(maxsize=4)
def _read_ssm_parameters(
    path: str,
    region: str,
    endpoint: str | None,
    token_issuer: bool,
    migrator: bool,
    only: tuple[str, ...] | None = None,
) -> dict[str, str]:
    """The decrypted values of the parameters that exist under `path`, by name."""
    # Imported here: a stage without SSM secrets (dev, tests) never pays boto3's import.
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
    names = ssm_names(token_issuer=token_issuer, migrator=migrator, only=only)
    try:
        ssm = boto3.session.Session().client("ssm", **kwargs)
        found = ssm.get_parameters(Names=[f"{path}/{name}" for name in names], WithDecryption=True)
    except (BotoCoreError, ClientError) as exc:
        raise ConfigError(
            f"could not read the SSM parameters under MAOF_SECRETS_SSM_PATH={path}: {_one_line(exc)}"
        ) from None
    return {item["Name"][len(path) + 1 :]: str(item["Value"]) for item in found["Parameters"]}


class _SsmParameters(PydanticBaseSettingsSource):
    """The settings under MAOF_SECRETS_SSM_PATH, when it is set (none otherwise)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # one GetParameters call reads them all: see __call__

    def __call__(self) -> dict[str, Any]:
        where = _Bootstrap()
        if not where.secrets_ssm_path:
            return {}
        path = where.secrets_ssm_path
        values = _read_ssm_parameters(
            path,
            where.aws_region,
            where.aws_endpoint_url,
            where.token_issuer,
            where.migrator,
            where.secrets_ssm_names,
        )
        required = [name for name in SSM_REQUIRED if name in where.ssm_parameter_names]
        missing = [f"{path}/{name}" for name in required if not values.get(name)]
        if missing:
            raise ConfigError(
                f"SSM parameter {missing[0]} is missing or empty (MAOF_SECRETS_SSM_PATH={path}); "
                "create it as a SecureString"
            )
        return {field: values[name] for field, name in _SSM_PARAMETERS.items() if values.get(name)}


class Settings(_Bootstrap):
    """Every setting MAOF reads, as MAOF_<NAME>; `.env.example` documents each one."""

    # Secrets, and URLs that carry passwords: SSM's when there. Empty is unset: the dev
    # default in dev and test (DEV_DEFAULTS), refused elsewhere (_fit_for_the_stage).
    jwt_secret: str = ""
    # Keys being rotated out: still accepted to verify (JWTs) or decrypt (agent tokens).
    jwt_previous_secrets: PreviousKeys = ()
    # At least 32 characters (_fit_for_the_stage), or none where it is not read.
    secret_key: str = ""
    previous_secret_keys: PreviousKeys = ()
    database_url: str = ""
    # The owner of the schema, for the migrations only.
    migration_database_url: str = ""
    redis_url: str = ""
    # Outside dev and test: TLS for the database and Redis unless this is true.
    allow_insecure_connections: bool = False
    # Admins by user UUID, never by email: anyone may register any email (none is verified),
    # so an email listed before its owner registered it would make whoever did an admin.
    admin_user_uuids: Uuids = frozenset()
    stage_queue_name: str = "maof-stage-queue"
    stage_queue_url: str | None = None
    dashboard_bucket: str = "maof-dashboard"
    cors_origin: str = "*"
    access_token_ttl_seconds: int = Field(900, ge=10, le=86400)
    refresh_token_ttl_seconds: int = Field(7 * 86400, ge=60, le=90 * 86400)
    session_max_lifetime_seconds: int = Field(30 * 86400, ge=60, le=365 * 86400)
    # A body reaches the deployed API function inside a Lambda event of at most 6 MiB, as a
    # JSON string: each `"` and `\` in it twice. More could never arrive to be refused.
    max_body_bytes: int = Field(1_000_000, ge=1024, le=3_000_000)
    max_json_depth: int = Field(64, ge=4, le=512)
    log_level: Annotated[
        Literal["CRITICAL", "FATAL", "ERROR", "WARNING", "WARN", "INFO", "DEBUG", "NOTSET"],
        BeforeValidator(str.upper),
    ] = "INFO"
    mock_agent_delay_ms: int = Field(0, ge=0, le=600_000)
    mock_agent_failure_rate: float = Field(0.0, ge=0.0, le=1.0)
    # Why these values: docs/architecture.md "How a run heals itself" (a dead worker's stage runs
    # again within lease + interval; a lost message within queued-after + interval).
    stage_lease_seconds: int = Field(15, ge=3, le=3600)
    sweep_queued_after_seconds: int = Field(10, ge=0, le=86400)
    sweep_backlog_after_seconds: int = Field(300, ge=0, le=86400)
    sweep_interval_seconds: int = Field(5, ge=1, le=86400)
    stage_max_lease_expiries: int = Field(3, ge=0, le=1000)
    stage_max_requeues: int = Field(10, ge=0, le=10_000)
    stage_max_waits: int = Field(500, ge=0, le=1_000_000)
    stage_max_input_bytes: int = Field(1_000_000, ge=1024, le=100_000_000)
    stage_max_output_bytes: int = Field(1_000_000, ge=1024, le=100_000_000)
    run_max_output_bytes: int = Field(20_000_000, ge=1024, le=10_000_000_000)
    agent_max_output_depth: int = Field(100, ge=4, le=1000)
    run_stage_timeout_seconds: int = Field(900, ge=60, le=900)
    # A completion runs the first stage it made ready in the same invocation (no SQS hop).
    eager_dispatch: bool = True
    poller_concurrency: int = Field(16, ge=1, le=64)
    poller_processes: int = Field(2, ge=1, le=16)
    poller_batch_size: int = Field(10, ge=1, le=10)
    poller_wait_seconds: int = Field(1, ge=0, le=20)
    db_pool_size: int = Field(10, ge=1, le=100)
    db_max_overflow: int = Field(10, ge=0, le=100)
    # Postgres ends a session left idle inside a transaction this long, and its locks go
    # (0: not asked for, for a pooler that refuses startup options; set it on the role).
    db_idle_in_transaction_seconds: int = Field(60, ge=0, le=3600)
    # The longest a connection's statement waits on a lock, and runs, before Postgres ends
    # it (0: no limit). Set for the API (.chalice/config.json, the local API server), which
    # answers within API Gateway's 29 s; never for the workers nor the migrations.
    db_lock_timeout_ms: int = Field(0, ge=0, le=3_600_000)
    db_statement_timeout_ms: int = Field(0, ge=0, le=3_600_000)
    agent_cache_ttl_seconds: int = Field(30, ge=0, le=3600)
    mock_agents: bool = False
    # At most MAX_STAGE_TIMEOUT_MS, and the run_stage function's own limit
    # (max_stage_timeout_ms): a stage without timeoutMs gets it, as if it had asked.
    agent_timeout_ms: int = Field(30_000, ge=100, le=MAX_STAGE_TIMEOUT_MS)
    agent_retries: int = Field(2, ge=0, le=10)
    agent_backoff_ms: int = Field(1000, ge=0, le=3_600_000)
    agent_max_backoff_ms: int = Field(60_000, ge=0, le=86_400_000)
    agent_max_response_bytes: int = Field(
        1_000_000 + RESPONSE_ENVELOPE_BYTES, ge=1024, le=MAX_AGENT_RESPONSE_BYTES
    )
    agent_health_timeout_ms: int = Field(2000, ge=100, le=MAX_AGENT_HEALTH_TIMEOUT_MS)
    agent_health_interval_seconds: int = Field(60, ge=5, le=86400)
    allow_private_agent_endpoints: bool = False
    login_attempts_per_minute: int = Field(10, ge=1, le=10_000)
    login_attempts_per_ip_per_minute: int = Field(60, ge=1, le=1_000_000)
    registrations_per_ip_per_hour: int = Field(30, ge=1, le=1_000_000)
    submissions_per_minute: int = Field(300, ge=1, le=1_000_000)
    max_active_runs: int = Field(500, ge=1, le=1_000_000)
    # Retries of one run: each adds to its one audit chain (and its export), which must not
    # grow without end; past it, the workflow is submitted anew. It does not keep the trail
    # within one deployed answer (docs/api.md, "Size of the audit answers").
    run_max_retries: int = Field(20, ge=0, le=1000)
    # Live agents per account: each is probed every health interval, from MAOF's addresses.
    max_agents_per_user: int = Field(100, ge=1, le=100_000)
    # Agent health probes a user asks for (health-checks, registrations) per sliding minute.
    health_checks_per_minute: int = Field(60, ge=1, le=1_000_000)
    audit_signing_keys: str | None = None
    audit_keys_file: str = os.path.join(PROJECT_DIR, ".maof", "audit-signing-keys.json")
    audit_bucket: str = "maof-audit"
    audit_checkpoint_interval_seconds: int = Field(60, ge=1, le=86400)
    audit_checkpoint_max_runs: int = Field(10_000, ge=1, le=1_000_000)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # A parameter under MAOF_SECRETS_SSM_PATH wins over the same setting in the environment.
        return init_settings, _SsmParameters(settings_cls), env_settings

    @property
    def max_stage_timeout_ms(self) -> int:
        """The longest `timeoutMs` a stage may ask for: what the run_stage function can wait,
        less a margin to record the outcome (STAGE_TIMEOUT_MARGIN_SECONDS)."""
        return (self.run_stage_timeout_seconds - STAGE_TIMEOUT_MARGIN_SECONDS) * 1000

    @model_validator(mode="after")
    def _fit_for_the_stage(self) -> Self:
        """URLs of the right kind, a default agent timeout the run_stage function can give
        and a response cap that holds the largest output in every stage; elsewhere than dev
        and test, a JWT secret of its own, no dev default as any JWT secret or key, and
        connections that cross the network only over TLS."""
        for field in ("database_url", "migration_database_url", "redis_url"):
            if not getattr(self, field):  # unset: a default only in dev and test
                what = f"is required in stage {self.stage!r} (only dev and test have defaults)"
                raise ValueError(self._complaint(field, what))
        for field in ("database_url", "migration_database_url"):
            if not getattr(self, field).startswith(("postgresql://", "postgresql+psycopg://")):
                raise ValueError(self._complaint(field, "must be a postgresql:// URL"))
            if problem := _database_url_problem(getattr(self, field)):
                raise ValueError(self._complaint(field, problem))
        if not self.redis_url.startswith(("redis://", "rediss://")):
            raise ValueError(self._complaint("redis_url", "must be a redis:// or rediss:// URL"))
        if problem := _redis_url_problem(self.redis_url):
            raise ValueError(self._complaint("redis_url", problem))
        # A function reading its secrets from SSM but not the token ones has none to check.
        reads_none = bool(self.secrets_ssm_path) and not self.token_issuer and not self.jwt_secret
        if not self.is_dev and not reads_none and len(self.jwt_secret) < 32:
            what = f"must be at least 32 characters in stage {self.stage!r}"
            raise ValueError(self._complaint("jwt_secret", what))
        # Nor the secret key, for one whose MAOF_SECRETS_SSM_NAMES leaves secret-key out: it
        # encrypts and decrypts no agent token or callback secret (agents.secrets refuses to).
        keyless = bool(self.secrets_ssm_path) and "secret-key" not in self.ssm_parameter_names
        if not (keyless and not self.secret_key) and len(self.secret_key) < 32:
            raise ValueError(self._complaint("secret_key", "must be at least 32 characters"))
        # Both dev defaults are published here: as a JWT secret, current or previous, anyone
        # could sign a token; as a key, current or previous, read every stored secret.
        for field in ("jwt_secret", "jwt_previous_secrets", "secret_key", "previous_secret_keys"):
            value = getattr(self, field)
            given = value if isinstance(value, tuple) else (value,)
            if not self.is_dev and any(secret in DEV_SECRETS for secret in given):
                what = f"must not be a dev default in stage {self.stage!r}"
                raise ValueError(self._complaint(field, what))
        if self.agent_timeout_ms > self.max_stage_timeout_ms:
            raise ValueError(
                f"MAOF_AGENT_TIMEOUT_MS ({self.agent_timeout_ms}) may be at most "
                f"MAOF_RUN_STAGE_TIMEOUT_SECONDS ({self.run_stage_timeout_seconds}) less "
                f"{STAGE_TIMEOUT_MARGIN_SECONDS} s, {self.max_stage_timeout_ms} ms: the default "
                "timeout of every stage is held to the same limit as a stage's timeoutMs"
            )
        # An answer wraps its output: a smaller cap refuses outputs within theirs.
        least = min(self.stage_max_output_bytes, MAX_AGENT_RESPONSE_BYTES)
        if self.agent_max_response_bytes < least:
            raise ValueError(
                f"MAOF_AGENT_MAX_RESPONSE_BYTES ({self.agent_max_response_bytes}) must be at "
                f"least MAOF_STAGE_MAX_OUTPUT_BYTES ({self.stage_max_output_bytes}, or "
                f"{MAX_AGENT_RESPONSE_BYTES} if more): an agent's answer holds its output; "
                f"unset, it is the output cap + {RESPONSE_ENVELOPE_BYTES}"
            )
        # The migrations' URL is checked where it is used (chalicelib.db.migrate).
        for field in ("database_url", "redis_url"):
            if problem := self.tls_problem(field):
                raise ValueError(problem)
        return self

    def tls_problem(self, field: str) -> str | None:
        """What is wrong with the URL in `field` (database_url, migration_database_url or
        redis_url) if it would carry credentials and data in clear text: None over TLS, in
        the dev and test stages, or with MAOF_ALLOW_INSECURE_CONNECTIONS=true."""
        if self.is_dev or self.allow_insecure_connections:
            return None
        from urllib.parse import parse_qs, urlparse

        url: str = getattr(self, field)
        if field == "redis_url":
            if url.startswith("rediss://"):
                return None
            what = "must use TLS (rediss://)"
        else:
            sslmode = parse_qs(urlparse(url).query).get("sslmode", [""])[-1]
            if sslmode in ("require", "verify-ca", "verify-full"):
                return None
            what = "must use TLS (?sslmode=require or verify-full)"
        return self._complaint(field, what) + "; MAOF_ALLOW_INSECURE_CONNECTIONS=true overrides"

    def _complaint(self, field: str, what: str) -> str:
        """'MAOF_<FIELD> <what>', naming the SSM parameter that may supply it too."""
        hint = ""
        if self.secrets_ssm_path and field in _SSM_PARAMETERS:
            hint = f" (or the SSM parameter {self.secrets_ssm_path}/{_SSM_PARAMETERS[field]})"
        return f"{ENV_PREFIX}{field.upper()} {what}{hint}"


def _database_url_problem(url: str) -> str | None:
    """What SQLAlchemy would refuse in `url` only once connecting (its URL parser raises
    there, a traceback at start-up), never the URL itself, which may hold a password."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        port = make_url(url).port
    except (ArgumentError, ValueError):
        return "is not a URL SQLAlchemy can read: postgresql://user:password@host:port/database"
    if port is not None and not 0 < port < 65536:
        return f"must have a port between 1 and 65535, got {port}"
    return None


def _redis_url_problem(url: str) -> str | None:
    """What redis-py would refuse in `url` only once used (each use a ValueError, not an
    outage), or take for other than it says (a database that is not a number: db 0);
    never the URL itself, which may hold a password."""
    from urllib.parse import unquote, urlparse

    from redis.connection import parse_url  # redis-py leaves it unannotated

    try:
        host = parse_url(url).get("host")  # type: ignore[no-untyped-call]
        if host:
            host.encode("idna")  # how a name is looked up when connecting
    except ValueError:  # UnicodeError too; its words may quote part of the password
        return (
            "is not a valid Redis URL: redis[s]://[user:password@]host[:port][/db] "
            "(percent-encode # ? / @ in the password)"
        )
    database = unquote(urlparse(url).path).replace("/", "")
    if database and not (database.isascii() and database.isdigit()):
        return "must name its database by number after the port (/0), or none"
    return None


# What is wrong, by pydantic error type, after the variable's name. Only numbers, booleans
# and choices show the value given: none of them is a secret.
_WHAT = {
    "int_parsing": "must be a whole number, got {input!r}",
    "float_parsing": "must be a number, got {input!r}",
    "bool_parsing": "must be true or false, got {input!r}",
    "greater_than_equal": "must be between {ge} and {le}, got {input}",
    "less_than_equal": "must be between {ge} and {le}, got {input}",
    "literal_error": "must be one of {expected}, got {input!r}",
    "string_too_short": "must be at least {min_length} characters",
    "value_error": "{error}",
}


def _explain(error: ErrorDetails) -> str:
    """One line: the MAOF_* variable and what is wrong with it, never a secret's value."""
    context = error.get("ctx", {})
    if not error["loc"]:  # a rule across settings (_fit_for_the_stage), worded in full
        return str(context.get("error", error["msg"]))
    field = str(error["loc"][0])
    variable = ENV_PREFIX + field.upper()
    subject = variable if len(error["loc"]) == 1 else f"every value in {variable}"
    rules = Settings.model_fields[field].metadata if field in Settings.model_fields else []
    bounds = {
        key: getattr(rule, key) for rule in rules for key in ("ge", "le") if hasattr(rule, key)
    }
    details = {**bounds, **context, "input": error["input"], "msg": error["msg"]}
    return f"{subject} " + _WHAT.get(error["type"], "is not valid: {msg}").format(**details)


def load_settings() -> Settings:
    """Read and validate the settings (SSM's, then the environment's); raise ConfigError
    with one line."""
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError(_one_line(_explain(exc.errors(include_url=False)[0]))) from None


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read on first use."""
    return load_settings()


def import_time_setting(field: str) -> str:
    """One setting's raw value as the environment gives it, else the model's default,
    without validating the rest: for what must be known when a module is imported (Chalice
    binds routes, queues and schedules then, also where no secret exists, as in
    `chalice package`). The default stays declared once, on Settings."""
    value = os.environ.get(f"MAOF_{field.upper()}")
    if value:
        return value
    return str(Settings.model_fields[field].get_default(call_default_factory=True))


def import_time_int(field: str) -> int:
    """An integer setting known at import (import_time_setting), read as Settings read it
    (pydantic's lax int: '120.0' is 120; the field's bounds); ConfigError with one line
    naming the variable when Settings would refuse it."""
    info = Settings.model_fields[field]
    try:
        return TypeAdapter(Annotated[int, *info.metadata]).validate_python(
            import_time_setting(field)
        )
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        raise ConfigError(_one_line(_explain({**error, "loc": (field,)}))) from None


def reset_settings() -> None:
    """Forget cached settings and SSM parameters (tests change the environment)."""
    get_settings.cache_clear()
    _read_ssm_parameters.cache_clear()
