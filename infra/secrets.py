"""The SSM SecureString parameters a deployed stage reads: `make secrets`, `make rotate-key`."""

from __future__ import annotations

import json
import secrets as random
from collections.abc import Callable, Mapping
from typing import Any

from chalicelib.audit.keys import new_key_set, rotated
from chalicelib.config import SSM_MIGRATION_SECRETS, SSM_PREVIOUS_KEYS, SSM_SECRETS
from infra import DeployError, say

GENERATED: dict[str, Callable[[], str]] = {
    "jwt-secret": lambda: random.token_urlsafe(48),
    "secret-key": lambda: random.token_urlsafe(48),
    "audit-signing-key": new_key_set,  # the Ed25519 key set that signs the audit trail
}
# The application's role (INSERT and SELECT only on the audit trail), the schema owner's
# (only the migrate function reads it) and Redis's: asked for.
URLS = {
    "database-url": ("postgresql://", "postgresql+psycopg://"),
    "migration-database-url": ("postgresql://", "postgresql+psycopg://"),
    "redis-url": ("redis://", "rediss://"),
}
PREVIOUS = {"jwt-secret": "jwt-previous-secrets", "secret-key": "previous-secret-keys"}
AUDIT_KEY = "audit-signing-key"  # one parameter holds the whole key set
ROTATABLE = (*PREVIOUS, AUDIT_KEY)
KEEP_PREVIOUS = 2


def parameter_name(path: str, name: str) -> str:
    return f"{path.rstrip('/')}/{name}"


def all_parameters(path: str) -> list[str]:
    """Every parameter a stage may have under `path`: the previous keys a rotation left
    too (`make destroy DELETE_SECRETS=1` deletes them all)."""
    names = (*SSM_SECRETS, *SSM_PREVIOUS_KEYS, *SSM_MIGRATION_SECRETS)
    return [parameter_name(path, name) for name in names]


def put_secret(
    ssm: Any, name: str, value: str, kms_key_id: str | None, *, overwrite: bool = True
) -> None:
    key = {"KeyId": kms_key_id} if kms_key_id else {}
    ssm.put_parameter(Name=name, Value=value, Type="SecureString", Overwrite=overwrite, **key)


def _value(ssm: Any, name: str) -> str | None:
    found = ssm.get_parameters(Names=[name], WithDecryption=True)["Parameters"]
    return str(found[0]["Value"]) if found else None


def ensure_secrets(
    ssm: Any,
    path: str,
    *,
    urls: Mapping[str, str | None] | None = None,
    overwrite_urls: bool = False,
    ask: Callable[[str], str] | None = None,
    kms_key_id: str | None = None,
) -> dict[str, str]:
    """Create the parameters missing under `path`; returns name -> created, updated, exists
    or missing. Generated ones are never replaced (a new secret-key could not decrypt the
    agent tokens stored: rotate_key does that); URLs come from `urls`, else `ask`."""
    names = [parameter_name(path, name) for name in (*GENERATED, *URLS)]
    found = ssm.get_parameters(Names=names)["Parameters"]
    existing = {item["Name"].rsplit("/", 1)[1]: item["Type"] for item in found}
    result: dict[str, str] = {}
    for name in (*GENERATED, *URLS):
        generate, exists = GENERATED.get(name), name in existing
        if exists and (generate or not overwrite_urls):
            result[name] = "exists"
            continue
        value = generate() if generate else ((urls or {}).get(name) or (ask and ask(name)) or "")
        if not value.strip():
            result[name] = "exists" if exists else "missing"
            continue
        if not generate and not value.startswith(URLS[name]):
            raise DeployError(f"{name} must start with {' or '.join(URLS[name])}")
        put_secret(ssm, parameter_name(path, name), value.strip(), kms_key_id, overwrite=exists)
        result[name] = "updated" if exists else "created"
    for name, kind in existing.items():
        if kind != "SecureString":
            say(f"warning: {parameter_name(path, name)} is a {kind} parameter, not a SecureString")
    return result


def require_secrets(ssm: Any, path: str, stage: str, kms_key_id: str | None = None) -> None:
    """What deploy checks first: make the random secrets, insist on the URLs."""
    result = ensure_secrets(ssm, path, kms_key_id=kms_key_id)
    if missing := [name for name, state in result.items() if state == "missing"]:
        raise DeployError(
            f"SSM parameter {parameter_name(path, missing[0])} is missing: run "
            f"`make secrets STAGE={stage}` first (it asks for the two database URLs and Redis's)"
        )
    states = (name if state == "exists" else f"{name} ({state})" for name, state in result.items())
    say(f"SSM parameters under {path}: {', '.join(states)}")


def rotate_key(ssm: Any, path: str, key: str, kms_key_id: str | None = None) -> list[str]:
    """A new value for `key`, the current one kept first among its previous values (at most
    KEEP_PREVIOUS); returns those. For audit-signing-key: a new current key joins the key
    set, the old ones keep only their public halves; returns their kids."""
    if key not in ROTATABLE:
        raise DeployError(f"KEY must be one of {', '.join(ROTATABLE)}, got {key!r}")
    if (current := _value(ssm, parameter_name(path, key))) is None:
        raise DeployError(f"{parameter_name(path, key)} does not exist: run `make secrets` first")
    if key == AUDIT_KEY:
        new_set = rotated(current)
        put_secret(ssm, parameter_name(path, key), new_set, kms_key_id)
        return [str(k["kid"]) for k in json.loads(new_set)["keys"][:-1]]
    older = (_value(ssm, parameter_name(path, PREVIOUS[key])) or "").split(",")
    previous = [current, *[value for value in older if value and value != current]]
    previous = previous[:KEEP_PREVIOUS]
    put_secret(ssm, parameter_name(path, PREVIOUS[key]), ",".join(previous), kms_key_id)
    put_secret(ssm, parameter_name(path, key), random.token_urlsafe(48), kms_key_id)
    return previous


def retire_previous(ssm: Any, path: str, key: str) -> bool:
    """Delete `key`'s previous values; True if there were any."""
    if key == AUDIT_KEY:
        raise DeployError(
            "audit signing keys are never retired: entries and checkpoints they signed verify "
            "with them (rotate-key already removed the old private key)"
        )
    if key not in PREVIOUS:
        raise DeployError(f"KEY must be one of {', '.join(PREVIOUS)}, got {key!r}")
    name = parameter_name(path, PREVIOUS[key])
    return name in ssm.delete_parameters(Names=[name])["DeletedParameters"]
