"""Password hashing with bcrypt.

bcrypt reads at most 72 bytes, and passwords may be 128 characters (up to 512 bytes of
UTF-8), so the password is first reduced to a fixed 44-byte SHA-256 digest (base64):
every character counts, and no input is truncated.

Passwords are hashed NFKC-normalised (NIST SP 800-63B 5.1.1.2): platforms and input
methods send the same typed text in different Unicode forms ("é" as one character or as
"e" and a combining accent, full-width letters). Hashes made before that are of the
password as it was sent, so verification also tries that form when it differs.
"""

from __future__ import annotations

import base64
import hashlib
import unicodedata

import bcrypt


def _prehash(password: str) -> bytes:
    return base64.b64encode(hashlib.sha256(password.encode("utf-8")).digest())


def _normalized(password: str) -> str:
    return unicodedata.normalize("NFKC", password)


# Checked against when the email is unknown, so both failures cost the same time.
# Precomputed (cost 10, like real hashes) so no bcrypt work runs at import (cold start).
_DUMMY_HASH = "$2b$10$71pUo/xVmG/.ojEd.4YeW.uJOPXBgbqmA9a9e5JDThEsjMXBnxS3y"


def hash_password(password: str, rounds: int = 10) -> str:
    return bcrypt.hashpw(_prehash(_normalized(password)), bcrypt.gensalt(rounds=rounds)).decode()


def verify_password(password: str, hashed: str | None) -> bool:
    """Whether `password`, in whatever Unicode form it was sent, is the one `hashed` was
    made of; never for None (an unknown user), which costs the same bcrypt work."""
    forms = [_normalized(password)]
    if forms[0] != password:
        forms.append(password)  # a hash made before normalisation
    target = (hashed or _DUMMY_HASH).encode()
    matches = any(bcrypt.checkpw(_prehash(form), target) for form in forms)
    return hashed is not None and matches
