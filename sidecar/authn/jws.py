"""Compact JWS parsing and JWT claim checks for the `jwt` authenticator's hot path.

PyJWT checks each base64url segment's alphabet one character at a time in Python (~60 µs per token here, and
the header is parsed twice when the key must be chosen by `kid` first): more than the RSA verification itself.
So the token is split and checked here with one compiled regex per segment, and the signature verified by
PyJWT's own algorithm objects (over `cryptography`). Claims are checked as RFC 7519 §4.1 says; any failure is
an `Unauthenticated` with a stable detail, never another exception."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
from collections.abc import Sequence
from functools import cache
from typing import Any

import jwt

from sidecar.errors import Unauthenticated

# RFC 7515 §2: base64url without padding.
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _malformed() -> Unauthenticated:
    return Unauthenticated("the token is not a well-formed JWT", detail="malformed")


class Token:
    __slots__ = ("header", "payload_segment", "signature", "signing_input")

    def __init__(self, token: str) -> None:
        parts = token.split(".")
        if len(parts) != 3 or not all(_SEGMENT.fullmatch(part) for part in parts):
            raise _malformed()
        try:
            header = json.loads(_b64decode(parts[0]))
            self.signature = _b64decode(parts[2])
        except (ValueError, binascii.Error, RecursionError):
            raise _malformed() from None
        if not isinstance(header, dict):
            raise _malformed()
        self.header: dict[str, Any] = header
        self.payload_segment = parts[1]
        self.signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")

    def verify(self, alg: str, keys: Sequence[Any]) -> dict[str, Any]:
        """The payload, once the signature verifies with one of the keys."""
        algorithm = _algorithm(alg)
        for key in keys:
            try:
                if algorithm.verify(self.signing_input, key, self.signature):
                    break
            except Exception:  # noqa: S112  a key that cannot check this signature is just not the key
                continue
        else:
            raise Unauthenticated("the token's signature is invalid", detail="bad signature")
        try:
            payload = json.loads(_b64decode(self.payload_segment))
        except (ValueError, binascii.Error, RecursionError):
            raise _malformed() from None
        if not isinstance(payload, dict):
            raise _malformed()
        return payload


@cache
def _algorithm(alg: str) -> Any:
    return jwt.get_algorithm_by_name(alg)


def _number(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Unauthenticated(f"the token's {name} claim is not a number", detail=name)
    return float(value)


def check_claims(
    claims: dict[str, Any], *, leeway: float, issuer: str | list[str] | None, audience: str | list[str] | None,
    required: Sequence[str],
) -> None:
    now = time.time()
    for name in ("exp", *required):
        if name not in claims:
            raise Unauthenticated(f"the token lacks the {name} claim", detail="missing claim")
    exp = _number(claims, "exp")
    if exp is not None and now > exp + leeway:
        raise Unauthenticated("the token has expired", detail="expired")
    nbf = _number(claims, "nbf")
    if nbf is not None and now < nbf - leeway:
        raise Unauthenticated("the token is not valid yet", detail="immature")
    iat = _number(claims, "iat")
    if iat is not None and iat > now + leeway:
        raise Unauthenticated("the token was issued in the future", detail="iat")
    if issuer is not None:
        accepted = [issuer] if isinstance(issuer, str) else issuer
        if claims.get("iss") not in accepted:
            raise Unauthenticated("the token's issuer is not trusted", detail="issuer")
    if audience is not None:
        expected = {audience} if isinstance(audience, str) else set(audience)
        got = claims.get("aud")
        given = [got] if isinstance(got, str) else got if isinstance(got, list) else []
        if not any(isinstance(a, str) and a in expected for a in given):
            raise Unauthenticated("the token is not meant for this audience", detail="audience")
