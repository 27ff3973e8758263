"""IP-bound keys (seed 001, "generateMapToken") and the session cookies that follow them: the format, and the
keys that protect both, derived from the top-level `keys.secret`.

A key is `ab_` + base64url(version ‖ nonce ‖ AES-256-GCM(claims)): opaque to its holder, and any change to
it fails authentication (GCM's tag, NIST SP 800-38D). The claims are a compact JSON object: user, issuing
client, issue time, and optionally the bound IP, the expiry, single use and the logout URL. Typical keys are
120 to 200 characters, well under the ~2000 characters at which browsers and servers cut URLs.

Each configured secret yields two independent keys through HKDF (RFC 5869) with distinct `info` labels, so
the AES key and the session-cookie HMAC key are never the same bytes. The first secret seals and signs;
every secret is tried when opening (rotation). Without `keys.secret`, a random secret made at import is used:
keys then die with the process and are not shared by workers or replicas (`sidecar check` warns).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sidecar.timestamps import timestamp

__all__ = ["KEY_PREFIX", "InvalidKey", "KeyClaims", "Keyring", "keyring_for", "used_mark"]

KEY_PREFIX = "ab_"
MAX_KEY_LENGTH = 4096
_VERSION = b"\x01"
_NONCE = 12
_AAD = b"sidecar ip_key v1"  # binds the ciphertext to this format and version
_PROCESS_SECRET = os.urandom(32)


class InvalidKey(Exception):
    """A key that is not one of ours (garbage, tampered, or sealed under a secret no longer configured)."""


@dataclass(frozen=True, slots=True)
class KeyClaims:
    user: str
    client: str
    issued_at: int
    ip: str | None = None
    expires_at: int | None = None
    single_use: bool = False
    url_logout: str | None = None

    def pack(self) -> bytes:
        short = {"u": self.user, "c": self.client, "t": self.issued_at, "i": self.ip, "e": self.expires_at,
                 "s": 1 if self.single_use else None, "l": self.url_logout}
        return json.dumps({k: v for k, v in short.items() if v is not None}, separators=(",", ":"),
                          ensure_ascii=False).encode()

    @classmethod
    def unpack(cls, data: bytes) -> KeyClaims:
        try:
            raw: Any = json.loads(data)
            issued_at, expires_at = timestamp(raw["t"]), timestamp(raw.get("e"))
            if issued_at is None or (expires_at is None and raw.get("e") is not None):
                raise ValueError("not a timestamp")
            return cls(user=str(raw["u"]), client=str(raw["c"]), issued_at=int(issued_at), ip=raw.get("i"),
                       expires_at=None if expires_at is None else int(expires_at), single_use=bool(raw.get("s")),
                       url_logout=raw.get("l"))
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
            raise InvalidKey("malformed claims") from None


def _derive(secret: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(secret)


class Keyring:
    def __init__(self, secrets: tuple[bytes, ...]) -> None:
        self._ciphers = [AESGCM(_derive(s, b"sidecar ip_key aes-256-gcm v1")) for s in secrets]
        self.session_keys = [_derive(s, b"sidecar session cookie hmac-sha256 v1") for s in secrets]

    def seal(self, claims: KeyClaims) -> str:
        nonce = os.urandom(_NONCE)  # 96 random bits per key: far below GCM's 2^32-messages-per-key bound
        sealed = self._ciphers[0].encrypt(nonce, claims.pack(), _AAD)
        return KEY_PREFIX + base64.urlsafe_b64encode(_VERSION + nonce + sealed).rstrip(b"=").decode("ascii")

    def open(self, key: str) -> KeyClaims:
        if not key.startswith(KEY_PREFIX) or len(key) > MAX_KEY_LENGTH:
            raise InvalidKey("not a key")
        body = key[len(KEY_PREFIX):]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError):
            raise InvalidKey("not base64url") from None
        if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != body:
            raise InvalidKey("not canonical base64url")  # one key, one spelling: no aliases for single use
        if len(raw) < 1 + _NONCE + 16 or raw[:1] != _VERSION:
            raise InvalidKey("unknown version or too short")
        nonce, sealed = raw[1:1 + _NONCE], raw[1 + _NONCE:]
        for cipher in self._ciphers:
            try:
                return KeyClaims.unpack(cipher.decrypt(nonce, sealed, _AAD))
            except InvalidTag:
                continue
        raise InvalidKey("tampered, or sealed under another secret")


@lru_cache(maxsize=8)
def _keyring(secrets: tuple[str, ...]) -> Keyring:
    return Keyring(tuple(s.encode() for s in secrets) if secrets else (_PROCESS_SECRET,))


def keyring_for(config: Any) -> Keyring:
    """The keyring of the configuration in force (derived once per set of secrets, so a reload that rotates
    `keys.secret` takes effect at once)."""
    return _keyring(tuple(config.keys.secrets()))


def used_mark(key: str) -> str:
    """The store key that marks a single-use key as spent: a hash, never the key itself."""
    digest = hashlib.sha256(key.encode("ascii")).hexdigest()[:32]
    return f"sidecar:key-used:{{{digest}}}"
