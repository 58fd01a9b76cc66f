"""The `migrate` Lambda function, the one with the schema owner's rights: upgrade the
database to head, or move every stored agent token to the current MAOF_SECRET_KEY."""

from __future__ import annotations

from typing import Any

from chalicelib.agents.secrets import reencrypt_all
from chalicelib.db import schema_revision
from chalicelib.db.migrate import owner_engine, upgrade

REENCRYPT = "reencrypt-agent-tokens"


def handler(event: Any = None) -> dict[str, Any]:
    """Upgrade the database to head; or, given `{"action": "reencrypt-agent-tokens"}`,
    re-encrypt the agent tokens and callback secrets (`make rotate-key`; the action keeps
    its first name).

    Returns the revision before and after (or the secrets rewritten, and those no key can
    read, which are skipped: `{"reencrypted", "unreadable"}`); any failure raises, so
    the invocation reports a FunctionError and the make target stops with its message.
    """
    action = event.get("action") if isinstance(event, dict) else None
    if action == REENCRYPT:
        done = reencrypt_all()
        return {"reencrypted": done.rewritten, "unreadable": done.unreadable}
    if action is not None:
        raise ValueError(f"unknown action {action!r}")

    owner = owner_engine()
    try:
        before = upgrade()
        after = schema_revision(owner)
    finally:
        owner.dispose()
    return {"migrated": before != after, "fromRevision": before, "toRevision": after}
