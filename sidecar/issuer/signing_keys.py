"""The issuer's signing keys: the first signs, all are published in the JWKS (several during rotation).
A key's `kid` is its RFC 7638 thumbprint, so it is stable across restarts and replicas."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from sidecar.config.types import load_private_key

# The `typ` header tells the sidecar's two kinds of JWT apart (RFC 8725 §3.11): access tokens (RFC 9068) may be
# presented as credentials; identity tokens (X-Auth-Token) are for the backend only and are never accepted.
ACCESS_TOKEN_TYPE = "at+jwt"
IDENTITY_TOKEN_TYPE = "sidecar-identity+jwt"


def algorithm_for(key: Any) -> str:
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return {256: "ES256", 384: "ES384", 521: "ES512"}[key.curve.key_size]
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "EdDSA"
    raise ValueError("unsupported signing key type; use RSA, EC or Ed25519")


def public_jwk(public_key: Any) -> dict[str, Any]:
    alg = algorithm_for(public_key)
    algorithm = jwt.get_algorithm_by_name(alg)
    jwk: dict[str, Any] = json.loads(algorithm.to_jwk(public_key))
    required = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x")}[jwk["kty"]]
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    kid = base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


class SigningKeys:
    def __init__(self, pems: list[str], issuer: str) -> None:
        self.issuer = issuer
        self._private = [load_private_key(pem) for pem in pems]
        self._jwks = [public_jwk(key.public_key()) for key in self._private]
        self.public_keys: list[tuple[str, Any]] = [
            (jwk["kid"], key.public_key()) for jwk, key in zip(self._jwks, self._private, strict=True)
        ]

    def __bool__(self) -> bool:
        return bool(self._private)

    def jwks(self) -> dict[str, Any]:
        return {"keys": list(self._jwks)}

    def sign(self, claims: dict[str, Any], lifetime: float, typ: str = ACCESS_TOKEN_TYPE) -> str:
        now = int(time.time())
        payload = {"iss": self.issuer, "iat": now, "exp": now + int(lifetime), "jti": uuid.uuid4().hex, **claims}
        jwk = self._jwks[0]
        return jwt.encode(payload, self._private[0], algorithm=jwk["alg"], headers={"kid": jwk["kid"], "typ": typ})
