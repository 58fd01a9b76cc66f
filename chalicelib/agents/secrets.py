"""Agent auth tokens encrypted at rest (Fernet, key derived from MAOF_SECRET_KEY)."""

from __future__ import annotations

import base64
import functools
import hashlib

from cryptography.fernet import Fernet

from chalicelib.config import get_settings


@functools.lru_cache(maxsize=1)
def _fernet() -> Fernet:
    digest = hashlib.sha256(get_settings().secret_key.encode("utf-8")).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


def encrypt_token(token: str) -> str:
    return _fernet().encrypt(token.encode("utf-8")).decode("ascii")


def decrypt_token(ciphertext: str) -> str:
    return _fernet().decrypt(ciphertext.encode("ascii")).decode("utf-8")
