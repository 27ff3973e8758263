"""Small HMAC-signed values with the expiry inside: the `cookie` authenticator's `signed:` cookies (made by the
customer's portal) and the `ip_key` session cookies (made by the sidecar).

Format (every part base64url without padding, RFC 4648 §5, so the value is cookie- and URL-safe):

    v1.<payload>.<signature>
    payload   = base64url(JSON object, UTF-8), with "exp" (seconds since the epoch, a number) and usually "sub"
    signature = base64url(HMAC-SHA256(secret, "v1." + payload))

The signature covers the version and the payload bytes exactly as sent, so nothing is re-serialised before
checking. Several secrets may be given for rotation: any of them verifies, the first signs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from collections.abc import Sequence
from typing import Any

from sidecar.timestamps import timestamp

__all__ = ["InvalidValue", "sign", "verify"]

VERSION = "v1"
MAX_LENGTH = 4096


class InvalidValue(Exception):
    """Why a signed value was refused: `malformed`, `bad signature` or `expired` (for the audit line)."""


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")


def _b64decode(text: str) -> bytes:
    if not _BASE64URL.fullmatch(text) or len(text) % 4 == 1:  # one char over a multiple of 4 encodes no byte
        raise InvalidValue("malformed")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error:
        raise InvalidValue("malformed") from None


def _mac(key: bytes, signed_part: str) -> bytes:
    return hmac.new(key, signed_part.encode("ascii"), hashlib.sha256).digest()


def sign(key: bytes, claims: dict[str, Any]) -> str:
    payload = _b64encode(json.dumps(claims, separators=(",", ":"), ensure_ascii=False).encode())
    signed_part = f"{VERSION}.{payload}"
    return f"{signed_part}.{_b64encode(_mac(key, signed_part))}"


def verify(
    keys: Sequence[bytes], value: str, *, leeway: float = 0.0, now: float | None = None, fresh: bool = True,
) -> dict[str, Any]:
    """The claims of a value signed by one of `keys` and (unless `fresh=False`) not expired; raises `InvalidValue`
    otherwise."""
    if len(value) > MAX_LENGTH or value.count(".") != 2:
        raise InvalidValue("malformed")
    version, payload, signature = value.split(".")
    if version != VERSION or not _BASE64URL.fullmatch(payload):
        raise InvalidValue("malformed")
    given = _b64decode(signature)
    signed_part = f"{version}.{payload}"
    # Compare against every key without stopping early: the time taken says nothing about which key matched.
    matches = [hmac.compare_digest(_mac(key, signed_part), given) for key in keys]
    if not any(matches):
        raise InvalidValue("bad signature")
    try:
        claims = json.loads(_b64decode(payload))
    except (ValueError, UnicodeDecodeError):
        raise InvalidValue("malformed") from None
    if not isinstance(claims, dict):
        raise InvalidValue("malformed")
    exp = timestamp(claims.get("exp"))
    if exp is None:
        # Required, and finite (JSON parsers accept Infinity): a value without a real expiry would live forever.
        raise InvalidValue("malformed")
    if fresh and exp <= (time.time() if now is None else now) - leeway:
        raise InvalidValue("expired")
    return claims
