"""Secrets in SSM Parameter Store (LocalStack's here), as a deployed stage reads them.

`make secrets` / `make deploy` create the SecureString parameters under /maof/<stage>;
chalicelib.config reads them once per process when MAOF_SECRETS_SSM_PATH is set, before it
validates anything, and a missing one stops start-up with one line naming it.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
import jwt
import pytest

from chalicelib.agents.secrets import decrypt_token, encrypt_token
from chalicelib.audit.keys import ring_of
from chalicelib.auth import tokens
from chalicelib.config import (
    SSM_MIGRATION_SECRETS,
    SSM_SECRETS,
    ConfigError,
    load_settings,
    reset_settings,
    ssm_names,
)
from chalicelib.core.api import Principal
from infra import DeployError
from infra.secrets import ensure_secrets, parameter_name, require_secrets
from tests.integration.conftest import SSM_DATABASE_URL as DATABASE_URL
from tests.integration.conftest import SSM_MIGRATION_DATABASE_URL as MIGRATION_URL
from tests.integration.conftest import SSM_REDIS_URL as REDIS_URL

pytestmark = pytest.mark.integration


ALL = [*SSM_SECRETS, *SSM_MIGRATION_SECRETS]


def values(ssm: Any, path: str) -> dict[str, tuple[str, str]]:
    names = [parameter_name(path, name) for name in ALL]
    found = ssm.get_parameters(Names=names, WithDecryption=True)["Parameters"]
    return {p["Name"].rsplit("/", 1)[1]: (p["Type"], p["Value"]) for p in found}


def one_line(exc: pytest.ExceptionInfo[ConfigError]) -> str:
    message = str(exc.value)
    assert message and "\n" not in message and "\r" not in message
    return message


def test_make_secrets_generates_three_and_stores_the_urls(ssm: Any, ssm_path: str) -> None:
    urls = {
        "database-url": DATABASE_URL,
        "migration-database-url": MIGRATION_URL,
        "redis-url": REDIS_URL,
    }
    assert ensure_secrets(ssm, ssm_path, urls=urls) == dict.fromkeys(ALL, "created")
    stored = values(ssm, ssm_path)
    assert {kind for kind, _ in stored.values()} == {"SecureString"}
    jwt, key = stored["jwt-secret"][1], stored["secret-key"][1]
    assert len(jwt) >= 32 and len(key) >= 32 and jwt != key
    assert ring_of(stored["audit-signing-key"][1]).signer.kid  # an Ed25519 key set
    assert stored["database-url"][1] == DATABASE_URL
    assert stored["migration-database-url"][1] == MIGRATION_URL
    assert stored["redis-url"][1] == REDIS_URL

    # Again: nothing is replaced, least of all the key that decrypts stored agent tokens.
    other = {"database-url": "postgresql://elsewhere/maof"}
    assert ensure_secrets(ssm, ssm_path, urls=other) == dict.fromkeys(ALL, "exists")
    assert values(ssm, ssm_path) == stored

    # OVERWRITE=1 replaces the URLs given, and only those.
    result = ensure_secrets(ssm, ssm_path, urls=other, overwrite_urls=True)
    assert result == {**dict.fromkeys(ALL, "exists"), "database-url": "updated"}
    after = values(ssm, ssm_path)
    assert after["database-url"][1] == "postgresql://elsewhere/maof"
    assert after["jwt-secret"] == stored["jwt-secret"]
    assert after["secret-key"] == stored["secret-key"]


def test_make_secrets_asks_for_what_is_missing(ssm: Any, ssm_path: str) -> None:
    asked: list[str] = []

    def ask(name: str) -> str:
        asked.append(name)
        return {
            "database-url": DATABASE_URL,
            "migration-database-url": MIGRATION_URL,
            "redis-url": REDIS_URL,
        }[name]

    ensure_secrets(ssm, ssm_path, ask=ask)
    assert asked == ["database-url", "migration-database-url", "redis-url"]
    assert values(ssm, ssm_path)["redis-url"] == ("SecureString", REDIS_URL)


def test_a_url_of_the_wrong_kind_is_refused(ssm: Any, ssm_path: str) -> None:
    with pytest.raises(DeployError, match="database-url must start with postgresql://"):
        ensure_secrets(ssm, ssm_path, urls={"database-url": "mysql://db/maof"})
    assert "database-url" not in values(ssm, ssm_path)


def test_deploy_stops_before_anything_when_a_url_is_missing(ssm: Any, ssm_path: str) -> None:
    with pytest.raises(DeployError, match=f"{ssm_path}/database-url is missing.*make secrets"):
        require_secrets(ssm, ssm_path, "prod")
    # The random ones were made on the way, so `make secrets` only asks for the URLs.
    assert set(values(ssm, ssm_path)) == {"jwt-secret", "secret-key", "audit-signing-key"}


def test_a_prod_process_takes_its_secrets_from_ssm(
    ssm_prod: pytest.MonkeyPatch, ssm: Any, ssm_path: str
) -> None:
    ensure_secrets(ssm, ssm_path, urls={"database-url": DATABASE_URL, "redis-url": REDIS_URL})
    stored = values(ssm, ssm_path)
    settings = load_settings()
    assert settings.stage == "prod"
    assert settings.jwt_secret == stored["jwt-secret"][1]
    assert settings.secret_key == stored["secret-key"][1]
    assert settings.database_url == DATABASE_URL
    assert settings.redis_url == REDIS_URL


def names_asked_of_ssm(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The parameter names every GetParameters call made from now on asks for."""
    asked: list[str] = []
    client = boto3.session.Session.client

    def spying(self: Any, *args: Any, **kwargs: Any) -> Any:
        made = client(self, *args, **kwargs)
        made.meta.events.register(
            "provide-client-params.ssm.GetParameters",
            lambda params, **_: asked.extend(params["Names"]),
        )
        return made

    monkeypatch.setattr(boto3.session.Session, "client", spying)
    return asked


def test_only_the_api_function_reads_the_token_secrets(
    ssm_prod: pytest.MonkeyPatch, ssm: Any, ssm_path: str
) -> None:
    """The other functions' roles may not read jwt-secret (infra/template.json): they do
    not ask SSM for it (GetParameters fails whole on one name refused), so none of them
    holds a key to sign a token with, nor accepts one."""
    ensure_secrets(ssm, ssm_path, urls={"database-url": DATABASE_URL, "redis-url": REDIS_URL})
    ssm_prod.delenv("MAOF_TOKEN_ISSUER")
    asked = names_asked_of_ssm(ssm_prod)
    settings = load_settings()
    assert asked and {name.rsplit("/", 1)[1] for name in asked} == {
        *ssm_names(token_issuer=False, migrator=False)
    }
    assert not {"jwt-secret", "jwt-previous-secrets"} & {n.rsplit("/", 1)[1] for n in asked}
    assert settings.jwt_secret == ""
    assert settings.secret_key == values(ssm, ssm_path)["secret-key"][1]
    principal = Principal(uuid.uuid4(), "a@example.com", "user")
    with pytest.raises(ConfigError, match="MAOF_TOKEN_ISSUER"):
        tokens.issue(principal, tokens.ACCESS, session_id=uuid.uuid4(), version=0)
    signed = jwt.encode({"sub": "x"}, values(ssm, ssm_path)["jwt-secret"][1], algorithm="HS256")
    with pytest.raises(ConfigError):
        tokens.decode(signed, tokens.ACCESS)


@pytest.mark.parametrize(
    ("function", "reads_audit_key"),
    [("check_agent_health", False), ("write_audit_checkpoint", True)],
)
def test_the_health_checker_and_checkpointer_start_without_the_secret_key(
    ssm_prod: pytest.MonkeyPatch, ssm: Any, ssm_path: str, function: str, reads_audit_key: bool
) -> None:
    """Their roles may not read secret-key nor previous-secret-keys (which decrypt every
    agent token and callback secret; the health checker's not audit-signing-key either):
    with the environment .chalice/config.json gives them, they ask SSM for no more, start
    without them, and refuse to encrypt or decrypt rather than use an empty key."""
    ensure_secrets(ssm, ssm_path, urls={"database-url": DATABASE_URL, "redis-url": REDIS_URL})
    ssm_prod.delenv("MAOF_TOKEN_ISSUER")
    chalice = json.loads((Path(__file__).parents[2] / ".chalice" / "config.json").read_text())
    variables = chalice["stages"]["prod"]["lambda_functions"][function]["environment_variables"]
    for variable, value in variables.items():
        ssm_prod.setenv(variable, value)
    asked = names_asked_of_ssm(ssm_prod)
    settings = load_settings()
    wanted = {"database-url", "redis-url", *(["audit-signing-key"] if reads_audit_key else [])}
    assert {name.rsplit("/", 1)[1] for name in asked} == wanted
    assert settings.secret_key == "" and settings.previous_secret_keys == ()
    assert settings.database_url == DATABASE_URL and settings.redis_url == REDIS_URL
    assert bool(settings.audit_signing_keys) is reads_audit_key
    with pytest.raises(ConfigError, match="secret-key"):
        encrypt_token("t")
    with pytest.raises(ConfigError, match="secret-key"):
        decrypt_token("gAAAAAB-a-stored-token")


def test_a_parameter_wins_over_the_same_setting_in_the_environment(
    ssm_prod: pytest.MonkeyPatch, ssm: Any, ssm_path: str
) -> None:
    ensure_secrets(ssm, ssm_path, urls={"database-url": DATABASE_URL, "redis-url": REDIS_URL})
    ssm_prod.setenv("MAOF_JWT_SECRET", "e" * 40)
    ssm_prod.setenv("MAOF_DATABASE_URL", "postgresql://stale@old-host/maof")
    settings = load_settings()
    assert settings.jwt_secret == values(ssm, ssm_path)["jwt-secret"][1]
    assert settings.database_url == DATABASE_URL


def test_the_urls_may_come_from_the_environment(
    ssm_prod: pytest.MonkeyPatch, ssm: Any, ssm_path: str
) -> None:
    ensure_secrets(ssm, ssm_path)  # jwt-secret and secret-key only
    ssm_prod.setenv("MAOF_DATABASE_URL", DATABASE_URL)
    ssm_prod.setenv("MAOF_REDIS_URL", REDIS_URL)
    settings = load_settings()
    assert settings.database_url == DATABASE_URL
    assert settings.redis_url == REDIS_URL


def test_a_missing_secret_stops_start_up_with_one_line(
    ssm_prod: pytest.MonkeyPatch, ssm: Any, ssm_path: str
) -> None:
    ssm.put_parameter(
        Name=parameter_name(ssm_path, "secret-key"), Value="k" * 40, Type="SecureString"
    )
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = one_line(caught)
    assert f"{ssm_path}/jwt-secret is missing" in message
    assert "k" * 40 not in message


def test_a_missing_url_names_its_parameter(
    ssm_prod: pytest.MonkeyPatch, ssm: Any, ssm_path: str
) -> None:
    ensure_secrets(ssm, ssm_path)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert f"the SSM parameter {ssm_path}/database-url" in one_line(caught)


def test_parameters_are_read_once_per_process(
    ssm_prod: pytest.MonkeyPatch, ssm: Any, ssm_path: str
) -> None:
    ensure_secrets(ssm, ssm_path, urls={"database-url": DATABASE_URL, "redis-url": REDIS_URL})
    first = load_settings()
    ssm.delete_parameters(Names=[parameter_name(ssm_path, name) for name in SSM_SECRETS])
    assert load_settings() == first  # no second call to SSM
    reset_settings()
    with pytest.raises(ConfigError, match="jwt-secret is missing"):
        load_settings()


def test_an_unreachable_ssm_fails_fast_with_one_line(ssm_prod: pytest.MonkeyPatch) -> None:
    ssm_prod.setenv("MAOF_AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert time.monotonic() - started < 15
    assert "could not read the SSM parameters under MAOF_SECRETS_SSM_PATH=" in one_line(caught)


@pytest.mark.parametrize("path", ["maof/prod", "/", "/maof prod"])
def test_a_malformed_path_is_refused(ssm_prod: pytest.MonkeyPatch, path: str) -> None:
    ssm_prod.setenv("MAOF_SECRETS_SSM_PATH", path)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "MAOF_SECRETS_SSM_PATH must be an SSM path" in one_line(caught)
