"""`client_jwt`: a JWT the client signed with its own private key (seed 004), verified only with the public
key registered for *that* client (`clients[].public_key`, or the admin API). The client id comes from
`id_from` (`body.id`, `form.id`, `header:X-Client-Id`, `claim:iss`), the token from `token_from`.

Only RS256, PS256 and ES256: an HS256 token "signed" with the public key's bytes is refused before any key is
touched (the algorithm-confusion attack, CVE-2015-9235 / RFC 8725 §2.1). `max_age` bounds `iat` when the token
has no `exp` (the seed's tokens carry only `iat`); `replay: deny` refuses a `jti` seen before (RFC 7519
§4.1.7), marked in the store for the token's remaining lifetime."""

from __future__ import annotations

import hashlib
import time
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import Field, field_validator

from sidecar.authn.base import (
    AuthenticatorBase,
    AuthnContext,
    Credential,
    Identity,
    fingerprint,
    read_first,
    read_value,
)
from sidecar.authn.jws import Token, check_claims, fresh_until
from sidecar.config.types import CredentialSource, Duration, Model, Source, parse_source
from sidecar.errors import Unauthenticated
from sidecar.proxy.request_view import RequestView
from sidecar.state.store import PREFIX

Algorithm = Literal["RS256", "PS256", "ES256"]
ALGORITHMS: tuple[Algorithm, ...] = ("RS256", "PS256", "ES256")
_KEY_TYPE = {"RS256": rsa.RSAPublicKey, "PS256": rsa.RSAPublicKey, "ES256": ec.EllipticCurvePublicKey}


def parse_id_source(value: Any) -> Source:
    text = str(value).strip()
    if text.startswith("claim:"):
        if not text[6:]:
            raise ValueError("claim: needs a claim name, e.g. claim:iss")
        return Source(kind="claim", name=text[6:])
    return parse_source(value)


class ClientJwtConfig(Model):
    type: Literal["client_jwt"]
    id_from: Source = Field(default_factory=lambda: parse_source("body.id"))
    token_from: CredentialSource = Field(default_factory=lambda: parse_source("body.token"))
    algorithms: list[Algorithm] = Field(default_factory=lambda: list(ALGORITHMS), min_length=1)
    max_age: Duration = 300.0
    leeway: Duration = 30.0
    replay: Literal["allow", "deny"] = "allow"
    subject_claim: str = "email"
    audience: str | None = None
    max_token_size: int = Field(default=16384, ge=256)
    cache_ttl: Duration | None = None

    @field_validator("id_from", mode="before")
    @classmethod
    def _id_source(cls, value: Any) -> Source:
        return parse_id_source(value)


class ClientJwtAuthenticator(AuthenticatorBase):
    client_bound = True  # its identities are configured clients (proxy/route_plans.py, proxy/authorization.py)

    def __init__(self, name: str, config: ClientJwtConfig, context: AuthnContext) -> None:
        self.name = name
        self.config = config
        self.fingerprint = fingerprint(name, config)
        # Only the token is a credential to strip: the client id is not secret, and the backend may want it.
        self.sources: tuple[Source, ...] = (config.token_from,)
        self._id_claim = config.id_from.name if config.id_from.kind == "claim" else None
        self.needs_body = any(s.kind in ("form", "body") for s in (config.token_from, config.id_from))
        # A replay check must see every use, so its verdicts are never cached.
        self.cacheable = config.replay != "deny"
        self.cache_ttl = config.cache_ttl
        self.bearer = config.token_from == parse_source("header:Authorization")
        self._algorithms = frozenset(config.algorithms)
        self._context = context

    def credential(self, request: RequestView) -> Credential | None:
        token = read_first(request, self.sources, "token", max_length=self.config.max_token_size)
        if token is None or self._id_claim is not None:
            return token
        # The client id and the token travel together, so a verdict is cached for the pair (Credential.client_id).
        client_id = read_value(request, self.config.id_from) or ""
        return Credential(token.kind, token.value, token.source, client_id)

    async def verify(self, credential: Credential, request: RequestView) -> Identity:
        client_id = credential.client_id or ""
        parsed = Token(credential.value)
        alg = parsed.header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise Unauthenticated("the token's signing algorithm is not accepted", detail=f"alg {str(alg)[:16]!r}")
        if self._id_claim is not None:
            # Read only to pick the key; the same claim is checked again once the signature verified.
            value = parsed.unverified_claims().get(self._id_claim)
            client_id = value if isinstance(value, str) else ""
        if not client_id:
            raise Unauthenticated("the client id is missing", detail="missing id")
        client = self._context.policy.clients.get(client_id)
        key = await self._context.client_keys.key_for(client) if client is not None else None
        if client is None or key is None:
            detail = "unknown client" if client is None else "client has no public key"
            raise Unauthenticated("unknown client, or no public key is registered for it", detail=detail)
        if not isinstance(key, _KEY_TYPE[alg]):
            raise Unauthenticated("the token's algorithm does not fit the client's key", detail=f"alg {alg} vs key")
        claims = parsed.verify(alg, [key])
        if self._id_claim is not None and str(claims.get(self._id_claim)) != client_id:
            raise Unauthenticated("the token's client claim changed", detail="claim mismatch")
        lifetime = check_claims(claims, leeway=self.config.leeway, audience=self.config.audience, require_exp=False)
        expires_at = fresh_until(lifetime, max_age=self.config.max_age, leeway=self.config.leeway)
        if self.config.replay == "deny":
            await self._first_use(client_id, claims, expires_at)
        subject = claims.get(self.config.subject_claim) or claims.get("sub") or client_id
        return Identity(
            subject=str(subject), authenticator=self.name, client=client_id, scopes=frozenset(client.scopes),
            claims=claims, expires_at=expires_at,
        )

    async def _first_use(self, client_id: str, claims: dict[str, Any], fresh_until: float) -> None:
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > 256:
            raise Unauthenticated("this route refuses replays: the token needs a jti claim", detail="no jti")
        mark = hashlib.sha256(f"{client_id}\x00{jti}".encode()).hexdigest()
        ttl = max(1.0, fresh_until - time.time())
        if not await self._context.store.set(f"{PREFIX}jti:{mark}", "1", ttl, only_new=True):
            raise Unauthenticated("the token was already used", detail="replayed jti")

