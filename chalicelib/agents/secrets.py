"""Secrets encrypted at rest (agents' auth tokens, runs' callback secrets): Fernet keys
derived from MAOF_SECRET_KEY (encrypts and decrypts) and MAOF_PREVIOUS_SECRET_KEYS (decrypt
only), so the key rotates without downtime; `python -m chalicelib.agents.secrets reencrypt`
then moves every stored secret to the current key, after which the previous keys can be
dropped."""

from __future__ import annotations

import base64
import functools
import hashlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy import select, update

from chalicelib.agents.candidates import invalidate_capability
from chalicelib.config import ConfigError, get_settings
from chalicelib.db import session_scope
from chalicelib.db.models import Agent, WorkflowRun
from chalicelib.logs import logger


def _fernet_of(secret: str) -> Fernet:
    digest = hashlib.sha256(secret.encode("utf-8")).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


@functools.lru_cache(maxsize=4)
def _keys(current: str, previous: tuple[str, ...]) -> MultiFernet:
    return MultiFernet([_fernet_of(current), *(_fernet_of(key) for key in previous)])


def _fernet() -> MultiFernet:
    """The keys; never one derived from an empty secret key (a function whose
    MAOF_SECRETS_SSM_NAMES leaves secret-key out has none, and so encrypts nothing)."""
    settings = get_settings()
    if not settings.secret_key:
        raise ConfigError("no MAOF_SECRET_KEY: this function does not read secret-key")
    return _keys(settings.secret_key, settings.previous_secret_keys)


def encrypt_token(token: str) -> str:
    return _fernet().encrypt(token.encode("utf-8")).decode("ascii")


def decrypt_token(ciphertext: str) -> str:
    return _fernet().decrypt(ciphertext.encode("ascii")).decode("utf-8")


BATCH = 200


@dataclass(frozen=True)
class Reencryption:
    """What a re-encryption pass did: secrets moved to the current key, and secrets no
    configured key can read (left as they are; each is logged by table and id)."""

    rewritten: int = 0
    unreadable: int = 0

    def __add__(self, other: Reencryption) -> Reencryption:
        return Reencryption(self.rewritten + other.rewritten, self.unreadable + other.unreadable)


def reencrypt_all() -> Reencryption:
    """Re-encrypt every stored secret with the current key: agents' tokens, retiring the
    cached candidate lists that still hold the old ciphertexts, and runs' callback secrets
    (a pending callback, or one a retry re-arms, is signed with its secret long after the
    run was submitted). Cleared ones (NULL: a deleted agent's token, a completed run's
    secret once its callback was delivered or given up) are left so. Safe to run while MAOF
    serves: each batch is one transaction and a secret is readable under either key
    throughout. A secret no key reads (its key already dropped) is skipped, counted and
    logged, so it does not keep every later one on the old key."""
    capabilities: set[str] = set()
    agents = _reencrypt(
        Agent,
        "auth_token_encrypted",
        lambda agent: capabilities.update(agent.capabilities),
        Agent.capabilities,
    )
    for capability in capabilities:
        invalidate_capability(capability)
    return agents + _reencrypt(WorkflowRun, "callback_secret_encrypted")


def _reencrypt(
    model: Any, column: str, moved: Callable[[Any], object] = bool, *also: Any
) -> Reencryption:
    """Move `column` of every row of `model` that the current key cannot read to it, in
    batches by id; `moved(row)` for each row rewritten, a row of id, the secret and the
    columns `also`. Only those columns are read: a run's row also holds its definition,
    input and output (megabytes each), which a secret's rewrite has no use for."""
    fernet, current = _fernet(), _fernet_of(get_settings().secret_key)
    secret_column = getattr(model, column)
    rewritten, unreadable, after = 0, 0, None
    while True:
        with session_scope() as session:
            query = select(model.id, secret_column, *also).where(secret_column.is_not(None))
            query = query.order_by(model.id).limit(BATCH).with_for_update()
            if after is not None:
                query = query.where(model.id > after)
            rows = session.execute(query).all()
            changes = []
            for row in rows:
                secret = row[1].encode("ascii")
                if _readable(current, secret):
                    continue  # already under the current key
                try:
                    rotated = fernet.rotate(secret)
                except InvalidToken:
                    # Its key is gone: nothing can read it, and moving the rest matters more.
                    unreadable += 1
                    logger.warning(
                        "secret unreadable with every configured key; left as it is",
                        extra={"table": model.__tablename__, "column": column, "id": str(row.id)},
                    )
                    continue
                changes.append({"id": row.id, column: rotated.decode("ascii")})
                moved(row)
            if changes:
                session.execute(update(model), changes)  # by primary key, one statement
            rewritten += len(changes)
        if len(rows) < BATCH:
            return Reencryption(rewritten, unreadable)
        after = rows[-1].id


def _readable(fernet: Fernet, token: bytes) -> bool:
    try:
        fernet.decrypt(token)
    except InvalidToken:
        return False
    return True


def main(argv: list[str]) -> int:
    if argv != ["reencrypt"]:
        print("usage: python -m chalicelib.agents.secrets reencrypt", file=sys.stderr)
        return 2
    done = reencrypt_all()
    print(
        f"maof: re-encrypted {done.rewritten} agent tokens and callback secrets "
        "with the current MAOF_SECRET_KEY"
    )
    if done.unreadable:
        print(
            f"maof: {done.unreadable} secrets no configured key can read were left as they "
            "are (their agents and callbacks fail until given new ones; the log names them)",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
