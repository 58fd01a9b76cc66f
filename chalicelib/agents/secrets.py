"""Agent auth tokens encrypted at rest: Fernet keys derived from MAOF_SECRET_KEY (encrypts
and decrypts) and MAOF_PREVIOUS_SECRET_KEYS (decrypt only), so the key rotates without
downtime; `python -m chalicelib.agents.secrets reencrypt` then moves every stored token
to the current key, after which the previous keys can be dropped."""

from __future__ import annotations

import base64
import functools
import hashlib
import sys

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy import select

from chalicelib.agents.candidates import invalidate_capability
from chalicelib.config import get_settings
from chalicelib.db import session_scope
from chalicelib.db.models import Agent


def _fernet_of(secret: str) -> Fernet:
    digest = hashlib.sha256(secret.encode("utf-8")).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


@functools.lru_cache(maxsize=4)
def _keys(current: str, previous: tuple[str, ...]) -> MultiFernet:
    return MultiFernet([_fernet_of(current), *(_fernet_of(key) for key in previous)])


def _fernet() -> MultiFernet:
    settings = get_settings()
    return _keys(settings.secret_key, settings.previous_secret_keys)


def encrypt_token(token: str) -> str:
    return _fernet().encrypt(token.encode("utf-8")).decode("ascii")


def decrypt_token(ciphertext: str) -> str:
    return _fernet().decrypt(ciphertext.encode("ascii")).decode("utf-8")


BATCH = 200


def reencrypt_all() -> int:
    """Re-encrypt every stored agent token with the current key (deleted agents too: their
    rows keep a token), and retire the cached candidate lists that still hold the old
    ciphertexts. Safe to run while MAOF serves: each batch is one transaction and a token
    is readable under either key throughout. Returns how many were rewritten."""
    fernet, current = _fernet(), _fernet_of(get_settings().secret_key)
    rewritten, after = 0, None
    while True:
        with session_scope() as session:
            query = select(Agent).order_by(Agent.id).limit(BATCH).with_for_update()
            if after is not None:
                query = query.where(Agent.id > after)
            agents = session.scalars(query).all()
            capabilities: set[str] = set()
            for agent in agents:
                token = agent.auth_token_encrypted.encode("ascii")
                if _readable(current, token):
                    continue  # already under the current key
                agent.auth_token_encrypted = fernet.rotate(token).decode("ascii")
                capabilities.update(agent.capabilities)
                rewritten += 1
        for capability in capabilities:  # cached candidate lists hold the old ciphertexts
            invalidate_capability(capability)
        if len(agents) < BATCH:
            return rewritten
        after = agents[-1].id


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
    print(f"maof: re-encrypted {reencrypt_all()} agent tokens with the current MAOF_SECRET_KEY")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
