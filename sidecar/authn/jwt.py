"""`jwt`: a Bearer JWT (or one from `from:`), verified with static `keys`, a `jwks_url`, an HS `secret`, or
this sidecar's own issuer keys (`self_issued`). Checks exp, nbf, iat (with leeway), iss, aud,
`required_claims`; scopes from `scope` (space-separated) or `scp`."""

from __future__ import annotations

from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from pydantic import Field, field_validator, model_validator

from sidecar.authn.base import AuthenticatorBase, AuthnContext, Credential, Identity, fingerprint, read_first
from sidecar.authn.jws import Token, check_claims
from sidecar.config.types import (
    CredentialSource,
    Duration,
    Model,
    PublicKeyPem,
    Source,
    load_public_key,
    parse_source,
)
from sidecar.errors import Unauthenticated
from sidecar.issuer.signing_keys import IDENTITY_TOKEN_TYPE
from sidecar.proxy.request_view import RequestView

ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
SYMMETRIC = ("HS256", "HS384", "HS512")
DEFAULT_ALGORITHMS = ("RS256", "PS256", "ES256", "EdDSA")

_KEY_TYPES: dict[str, tuple[type, ...]] = {
    "RS": (rsa.RSAPublicKey,),
    "PS": (rsa.RSAPublicKey,),
    "ES": (ec.EllipticCurvePublicKey,),
    "Ed": (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey),
}


def default_bearer_sources() -> list[Source]:
    return [parse_source("header:Authorization")]


class JwtConfig(Model):
    type: Literal["jwt"]
    from_: list[CredentialSource] = Field(default_factory=default_bearer_sources, alias="from", min_length=1)
    jwks_url: str | None = None
    keys: list[PublicKeyPem] | None = None
    secret: str | None = None
    algorithms: list[str] | None = None
    issuer: str | list[str] | None = None
    audience: str | list[str] | None = None
    required_claims: list[str] = []
    leeway: Duration = 30.0
    self_issued: bool = False
    max_token_size: int = Field(default=8192, ge=256)
    cache_ttl: Duration | None = None

    @field_validator("keys", mode="before")
    @classmethod
    def _keys_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, value: list[str] | None) -> list[str] | None:
        for alg in value or []:
            if alg.lower() == "none":
                raise ValueError("alg none is never accepted; remove it")
            if alg not in ASYMMETRIC + SYMMETRIC:
                raise ValueError(f"unknown algorithm {alg!r}; use one of {', '.join(ASYMMETRIC + SYMMETRIC)}")
        return value

    @model_validator(mode="after")
    def _key_source(self) -> JwtConfig:
        if not (self.jwks_url or self.keys or self.secret or self.self_issued):
            raise ValueError("give the verification keys: jwks_url, keys (PEM), secret (HS*) or self_issued: true")
        if any(alg in SYMMETRIC for alg in self.algorithms or ()) and not self.secret:
            raise ValueError("HS* algorithms need an explicit secret; or remove them from algorithms")
        if self.secret and self.algorithms and not any(alg in SYMMETRIC for alg in self.algorithms):
            raise ValueError("a secret is only used with HS256/HS384/HS512; add one to algorithms")
        return self

    def allowed_algorithms(self) -> tuple[str, ...]:
        if self.algorithms:
            return tuple(self.algorithms)
        if self.secret and not (self.jwks_url or self.keys or self.self_issued):
            return ("HS256",)
        return DEFAULT_ALGORITHMS

    def warnings(self) -> list[str]:
        if self.secret and len(self.secret.encode()) < 32:
            return ["the HS secret is shorter than 32 bytes: it can be brute-forced; use 32 random bytes or more"]
        return []


class JwtAuthenticator(AuthenticatorBase):
    cacheable = True
    bearer = True

    def __init__(self, name: str, config: JwtConfig, context: AuthnContext) -> None:
        self.name = name
        self.config = config
        self.fingerprint = fingerprint(name, config)
        self.sources: tuple[Source, ...] = tuple(config.from_)
        self.needs_body = any(s.kind in ("form", "body") for s in self.sources)
        self.cache_ttl = config.cache_ttl
        self._algorithms = frozenset(config.allowed_algorithms())
        self._static_keys = [load_public_key(pem) for pem in config.keys or []]
        self._secret = config.secret.encode() if config.secret else None
        # One key cache per JWKS URL, kept by the context across reloads (a reload while the IdP is down keeps the
        # keys it had).
        self.key_set = context.jwks_for(config.jwks_url) if config.jwks_url else None
        self._context = context
        self._issuer = config.issuer
        self._audience = config.audience

    def credential(self, request: RequestView) -> Credential | None:
        return read_first(request, self.sources, "token", max_length=self.config.max_token_size)

    async def verify(self, credential: Credential, request: RequestView) -> Identity:
        token = Token(credential.value)
        header = token.header
        if header.get("typ") == IDENTITY_TOKEN_TYPE:
            raise Unauthenticated("an identity token is not a credential", detail="identity token presented")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise Unauthenticated("the token's signing algorithm is not accepted", detail=f"alg {alg!r}")
        kid = header.get("kid")  # a string or absent: Token refuses any other kid
        keys = await self._keys(alg, kid)
        if not keys:
            raise Unauthenticated("no key is known for this token", detail=f"unknown kid {kid!r}")
        claims = token.verify(alg, keys)
        lifetime = check_claims(claims, leeway=self.config.leeway, issuer=self._issuer, audience=self._audience,
                                required=self.config.required_claims)
        assert lifetime.exp is not None  # exp is required
        return self._identity(claims, lifetime.exp)

    async def _keys(self, alg: str, kid: str | None) -> list[Any]:
        if alg in SYMMETRIC:
            return [self._secret] if self._secret else []
        wanted = _KEY_TYPES[alg[:2]]
        keys: list[Any] = [k for k in self._static_keys if isinstance(k, wanted)]
        if self.config.self_issued:
            own = self._context.issuer_public_keys()
            keys += [k for k_kid, k in own if kid in (None, k_kid) and isinstance(k, wanted)]
        if self.key_set is not None:
            keys += [k.key for k in await self.key_set.keys_for(kid) if isinstance(k.key, wanted)]
        return keys

    def _identity(self, claims: dict[str, Any], exp: float) -> Identity:
        scopes = claims.get("scope", claims.get("scp", ""))
        if isinstance(scopes, str):
            scope_set = frozenset(scopes.split())
        elif isinstance(scopes, list) and all(isinstance(s, str) for s in scopes):
            scope_set = frozenset(scopes)
        else:
            raise Unauthenticated("the token's scope claim is malformed", detail="scope")
        client = claims.get("client_id") or claims.get("azp")
        subject = claims.get("sub") or client or ""
        if not isinstance(subject, str | int) or not isinstance(client, str | int | None):
            raise Unauthenticated("the token's sub or client_id claim is malformed", detail="sub")
        return Identity(
            subject=str(subject), authenticator=self.name, client=str(client) if client else None,
            scopes=scope_set, claims=claims, expires_at=exp,
        )

