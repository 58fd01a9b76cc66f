"""Password hashing with bcrypt.

bcrypt reads at most 72 bytes, and passwords may be 128 characters (up to 512 bytes of
UTF-8), so the password is first reduced to a fixed 44-byte SHA-256 digest (base64):
every character counts, and no input is truncated.
"""

from __future__ import annotations

import base64
import hashlib

import bcrypt


def _prehash(password: str) -> bytes:
    return base64.b64encode(hashlib.sha256(password.encode("utf-8")).digest())


# Checked against when the email is unknown, so both failures cost the same time.
# Precomputed (cost 10, like real hashes) so no bcrypt work runs at import (cold start).
_DUMMY_HASH = "$2b$10$71pUo/xVmG/.ojEd.4YeW.uJOPXBgbqmA9a9e5JDThEsjMXBnxS3y"


def hash_password(password: str, rounds: int = 10) -> str:
    return bcrypt.hashpw(_prehash(password), bcrypt.gensalt(rounds=rounds)).decode()


def verify_password(password: str, hashed: str | None) -> bool:
    candidate = _prehash(password)
    if hashed is None:
        bcrypt.checkpw(candidate, _DUMMY_HASH.encode())
        return False
    return bcrypt.checkpw(candidate, hashed.encode())
