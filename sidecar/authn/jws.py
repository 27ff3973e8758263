"""Compact JWS parsing and the one JWT claim checker (`check_claims`, `fresh_until`), for both the `jwt` and the
`client_jwt` authenticators; every timestamp claim is read through `sidecar/timestamps.py`.

PyJWT checks each base64url segment's alphabet one character at a time in Python (~60 µs per token here, and
the header is parsed twice when the key must be chosen by `kid` first): more than the RSA verification itself.
So the token is split and checked here with one compiled regex per segment, and the signature verified by
PyJWT's own algorithm objects (over `cryptography`). The header is held to RFC 7515 §4.1 and the claims to
RFC 7519 §4.1; any failure is an `Unauthenticated` with a stable detail, never another exception.

Everything PyJWT's `jwt.decode` refuses is refused here too; `tests/test_jwt_differential.py` feeds both the
same generated tokens and lists, with the reason, each place where this path is deliberately stricter."""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import Sequence
from functools import cache
from typing import Any, NamedTuple

import jwt

from sidecar.errors import Unauthenticated
from sidecar.timestamps import timestamp

# RFC 7515 §2: base64url without padding.
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
# A segment whose length is 2 or 3 modulo 4 ends in a character with unused low bits, which must be zero (RFC 4648
# §3.5, as PyJWT checks): otherwise several strings decode to one value and a signed token has look-alike twins.
_LAST = {2: frozenset("AQgw"), 3: frozenset("AEIMQUYcgkosw048")}


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _well_formed(segment: str) -> bool:
    if not _SEGMENT.fullmatch(segment):
        return False
    rest = len(segment) % 4
    return rest == 0 or segment[-1] in _LAST.get(rest, ())


def _malformed() -> Unauthenticated:
    return Unauthenticated("the token is not a well-formed JWT", detail="malformed")


def _check_header(header: dict[str, Any]) -> None:
    """RFC 7515 §4.1. `jku`, `x5u`, `jwk` and `x5c` are ignored: keys come from the configuration only, never from
    the token (a token carrying its own key proves nothing), and nothing is ever fetched from a token's URL. Of a
    member named twice the last counts, as in PyJWT (§5.2 allows either that or a refusal)."""
    if "crit" in header:
        # §4.1.11: extensions listed in `crit` must be understood or the JWS refused. This verifier implements none,
        # not even RFC 7797's `b64` (unencoded payloads), so a `crit` header is refused whatever it lists.
        raise Unauthenticated("the token uses critical header extensions (crit) that are not supported", detail="crit")
    if header.get("b64", True) is not True:
        # RFC 7797 §3: b64 false means the payload segment is not base64url of the signed bytes; not supported.
        raise Unauthenticated("the token's payload encoding (b64) is not supported", detail="b64")
    for name in ("kid", "typ"):
        if name in header and not isinstance(header[name], str):
            raise Unauthenticated(f"the token's {name} header is not a string", detail=name)


class Token:
    __slots__ = ("header", "payload_segment", "signature", "signing_input")

    def __init__(self, token: str) -> None:
        parts = token.split(".")
        if len(parts) != 3 or not all(_well_formed(part) for part in parts):
            raise _malformed()
        try:
            header = json.loads(_b64decode(parts[0]))
            self.signature = _b64decode(parts[2])
        except (ValueError, binascii.Error, RecursionError):
            raise _malformed() from None
        if not isinstance(header, dict):
            raise _malformed()
        _check_header(header)
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
        return self.unverified_claims()

    def unverified_claims(self) -> dict[str, Any]:
        """The payload before any signature check: only to choose the key, never to trust."""
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


class Lifetime(NamedTuple):
    exp: float | None
    iat: float | None


def _timestamp(claims: dict[str, Any], name: str) -> float | None:
    """A present claim must be a real timestamp: null, a string or Infinity is refused, never read as absent."""
    if name not in claims:
        return None
    value = timestamp(claims[name])
    if value is None:
        raise Unauthenticated(f"the token's {name} claim is not a valid timestamp", detail=name)
    return value


def check_claims(
    claims: dict[str, Any], *, leeway: float, issuer: str | list[str] | None = None,
    audience: str | list[str] | None = None, required: Sequence[str] = (), require_exp: bool = True,
) -> Lifetime:
    now = time.time()
    for name in ("exp", *required) if require_exp else tuple(required):
        if claims.get(name) is None:  # null is as absent (PyJWT's `require` too)
            raise Unauthenticated(f"the token lacks the {name} claim", detail="missing claim")
    exp, nbf, iat = (_timestamp(claims, name) for name in ("exp", "nbf", "iat"))
    if exp is not None and now > exp + leeway:
        raise Unauthenticated("the token has expired", detail="expired")
    if nbf is not None and now < nbf - leeway:
        raise Unauthenticated("the token is not valid yet", detail="immature")
    if iat is not None and iat > now + leeway:
        raise Unauthenticated("the token was issued in the future", detail="iat")
    for name in ("sub", "jti"):  # RFC 7519 §4.1.2, §4.1.7: strings
        if name in claims and not isinstance(claims[name], str):
            raise Unauthenticated(f"the token's {name} claim is not a string", detail=name)
    if issuer is not None:
        accepted = [issuer] if isinstance(issuer, str) else issuer
        if claims.get("iss") not in accepted:
            raise Unauthenticated("the token's issuer is not trusted", detail="issuer")
    if audience is not None:
        expected = {audience} if isinstance(audience, str) else set(audience)
        got = claims.get("aud")
        given = [got] if isinstance(got, str) else got if isinstance(got, list) else [None]
        if not all(isinstance(a, str) for a in given) or expected.isdisjoint(given):
            raise Unauthenticated("the token is not meant for this audience", detail="audience")
    return Lifetime(exp, iat)


def fresh_until(lifetime: Lifetime, *, max_age: float, leeway: float) -> float:
    """Until when a token that need not carry `exp` may be used (client_jwt): its `exp`, else `iat` + `max_age`
    (both with `leeway`); a token with neither, or whose `iat` is older than that, is refused."""
    if lifetime.exp is not None:
        return lifetime.exp + leeway
    if lifetime.iat is None:
        raise Unauthenticated("the token has neither exp nor iat; sign it with iat", detail="no iat")
    if lifetime.iat < time.time() - max_age - leeway:
        raise Unauthenticated("the token is too old; sign a new one for each request", detail="max_age")
    return lifetime.iat + max_age + leeway
