"""Password hashing with bcrypt."""

from __future__ import annotations

import bcrypt

# Checked against when the email is unknown, so both failures cost the same time.
_DUMMY_HASH = bcrypt.hashpw(b"maof-timing-equaliser", bcrypt.gensalt(rounds=10)).decode()


def hash_password(password: str, rounds: int = 10) -> str:
    return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(rounds=rounds)).decode()


def verify_password(password: str, hashed: str | None) -> bool:
    candidate = password.encode("utf-8")
    if hashed is None:
        bcrypt.checkpw(candidate, _DUMMY_HASH.encode())
        return False
    return bcrypt.checkpw(candidate, hashed.encode())
