"""The Ed25519 keys that sign audit entries and checkpoints: one current signing key and
every earlier one's public half, so old entries keep verifying with their `kid`.

The key set is a JSON document `{"keys": [JWK, ...]}`; each JWK has `kid` (its RFC 7638
thumbprint), `kty` "OKP", `crv` "Ed25519", `x`, `createdAt`, `retiredAt`, and the current
key also `d` (the private half). Deployed, it is the SSM SecureString `audit-signing-key`
(MAOF_AUDIT_SIGNING_KEYS: `make secrets` creates it, `make rotate-key
KEY=audit-signing-key` adds a key); in dev and tests, a file (MAOF_AUDIT_KEYS_FILE,
`.maof/audit-signing-keys.json` by default) made on first use.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from chalicelib.audit.verify import b64url_decode, b64url_encode
from chalicelib.config import ConfigError, get_settings

PUBLIC_MEMBERS = ("kid", "kty", "crv", "x", "createdAt", "retiredAt")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def thumbprint(x: str) -> str:
    """RFC 7638 JWK thumbprint of an Ed25519 public key (members crv, kty, x in order)."""
    canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":"))
    return b64url_encode(hashlib.sha256(canonical.encode("ascii")).digest())


def new_jwk(created_at: str | None = None) -> dict[str, Any]:
    """A fresh signing key as a private JWK."""
    private = Ed25519PrivateKey.generate()
    d = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    x = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    xs = b64url_encode(x)
    return {
        "kid": thumbprint(xs),
        "kty": "OKP",
        "crv": "Ed25519",
        "x": xs,
        "d": b64url_encode(d),
        "createdAt": created_at or now_iso(),
        "retiredAt": None,
    }


def new_key_set() -> str:
    return json.dumps({"keys": [new_jwk()]})


def rotated(key_set: str) -> str:
    """The key set with a new current key; the old one is retired and loses its private
    half (nothing signs with it again, everything it signed still verifies)."""
    keys = parse_key_set(key_set)
    stamp = now_iso()
    kept = [
        {name: key.get(name) for name in PUBLIC_MEMBERS}
        | {"retiredAt": key.get("retiredAt") or stamp}
        for key in keys
    ]
    return json.dumps({"keys": [*kept, new_jwk(stamp)]})


def parse_key_set(text: str) -> list[dict[str, Any]]:
    try:
        loaded = json.loads(text)
        keys = loaded["keys"] if isinstance(loaded, dict) else loaded
        if not isinstance(keys, list) or not keys:
            raise ValueError("no keys")
        for key in keys:
            if key.get("kty") != "OKP" or key.get("crv") != "Ed25519" or not key.get("x"):
                raise ValueError(f"key {key.get('kid')!r} is not an Ed25519 JWK")
            if key.get("kid") != thumbprint(key["x"]):
                raise ValueError(f"key {key.get('kid')!r}: kid is not its thumbprint")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"the audit signing key set is not valid: {exc}") from None
    return list(keys)


@dataclass(frozen=True)
class Signer:
    kid: str
    private: Ed25519PrivateKey

    def sign(self, digest: str) -> str:
        """Ed25519 over the ASCII bytes of `digest`, base64url without padding."""
        return b64url_encode(self.private.sign(digest.encode("ascii")))


@dataclass(frozen=True)
class KeyRing:
    signer: Signer
    public: list[dict[str, Any]]  # every key, public members only, oldest first

    def jwks(self) -> dict[str, Any]:
        return {"keys": self.public}


def ring_of(text: str) -> KeyRing:
    keys = parse_key_set(text)
    current = [k for k in keys if k.get("d") and not k.get("retiredAt")]
    if not current:
        raise ConfigError("the audit signing key set has no current key (with `d`)")
    latest = max(current, key=lambda k: str(k.get("createdAt")))
    private = Ed25519PrivateKey.from_private_bytes(b64url_decode(latest["d"]))
    derived = b64url_encode(
        private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    )
    if derived != latest["x"]:
        raise ConfigError(f"audit signing key {latest['kid']}: d does not match x")
    public = [{name: key.get(name) for name in PUBLIC_MEMBERS} for key in keys]
    return KeyRing(Signer(latest["kid"], private), public)


_file_lock = threading.Lock()


def _file_key_set(path: Path) -> str:
    """The dev/test key set file, created (mode 0600) on first use."""
    with _file_lock:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(f".{os.getpid()}.tmp")
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(new_key_set())
            try:
                os.link(temporary, path)  # first writer wins; others read its key
            except FileExistsError:
                pass
            finally:
                temporary.unlink()
        return path.read_text()


@functools.lru_cache(maxsize=1)
def key_ring() -> KeyRing:
    """The process's keys, read once (a rotation recycles the functions)."""
    settings = get_settings()
    if settings.audit_signing_keys:
        return ring_of(settings.audit_signing_keys)
    if not settings.is_dev:
        raise ConfigError(
            "MAOF_AUDIT_SIGNING_KEYS is not set (the SSM parameter audit-signing-key: "
            "`make secrets` creates it)"
        )
    return ring_of(_file_key_set(Path(settings.audit_keys_file)))


def reset() -> None:
    key_ring.cache_clear()
