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
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy import select

from chalicelib.agents.candidates import invalidate_capability
from chalicelib.config import ConfigError, get_settings
from chalicelib.db import session_scope
from chalicelib.db.models import Agent, WorkflowRun


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


def reencrypt_all() -> int:
    """Re-encrypt every stored secret with the current key: agents' tokens (deleted agents'
    too: their rows keep a token), retiring the cached candidate lists that still hold the
    old ciphertexts, and runs' callback secrets (a pending callback, or one a retry re-arms,
    is signed with its secret long after the run was submitted). Safe to run while MAOF
    serves: each batch is one transaction and a secret is readable under either key
    throughout. Returns how many were rewritten."""
    capabilities: set[str] = set()
    rewritten = _reencrypt(
        Agent, "auth_token_encrypted", lambda agent: capabilities.update(agent.capabilities)
    )
    for capability in capabilities:
        invalidate_capability(capability)
    return rewritten + _reencrypt(WorkflowRun, "callback_secret_encrypted")


def _reencrypt(model: Any, column: str, moved: Callable[[Any], object] = bool) -> int:
    """Move `column` of every row of `model` that the current key cannot read to it, in
    batches by id; `moved(row)` for each row rewritten."""
    fernet, current = _fernet(), _fernet_of(get_settings().secret_key)
    rewritten, after = 0, None
    while True:
        with session_scope() as session:
            query = select(model).where(getattr(model, column).is_not(None))
            query = query.order_by(model.id).limit(BATCH).with_for_update()
            if after is not None:
                query = query.where(model.id > after)
            rows = session.scalars(query).all()
            for row in rows:
                secret = getattr(row, column).encode("ascii")
                if _readable(current, secret):
                    continue  # already under the current key
                setattr(row, column, fernet.rotate(secret).decode("ascii"))
                moved(row)
                rewritten += 1
        if len(rows) < BATCH:
            return rewritten
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
    print(
        f"maof: re-encrypted {reencrypt_all()} agent tokens and callback secrets "
        "with the current MAOF_SECRET_KEY"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
