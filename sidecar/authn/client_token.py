"""`client_token`: a per-client access token (seed 000) from `X-Client-Token` or `Authorization: Bearer`,
looked up by SHA-256 hash among the clients' tokens and those minted through the admin API. Verdicts are
cached in-process only (the lookup itself is the shared state) and evicted everywhere on revocation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sidecar.authn.base import AuthenticatorBase, AuthnContext, Credential, Identity, fingerprint, read_first
from sidecar.config.types import CredentialSource, Duration, Model, Source, parse_source
from sidecar.errors import Unauthenticated
from sidecar.proxy.request_view import RequestView
from sidecar.state.client_token_store import token_hash


def default_sources() -> list[Source]:
    return [parse_source("header:X-Client-Token"), parse_source("header:Authorization")]


class ClientTokenConfig(Model):
    type: Literal["client_token"]
    from_: list[CredentialSource] = Field(default_factory=default_sources, alias="from", min_length=1)
    cache_ttl: Duration | None = None


class ClientTokenAuthenticator(AuthenticatorBase):
    cacheable = True
    revocable = True  # its cached verdicts are dropped when revocations cannot be heard
    client_bound = True  # its identities are configured clients (proxy/route_plans.py, proxy/authorization.py)
    bearer = True

    def __init__(self, name: str, config: ClientTokenConfig, context: AuthnContext) -> None:
        self.name = name
        self.fingerprint = fingerprint(name, config)
        self.sources: tuple[Source, ...] = tuple(config.from_)
        self.needs_body = any(s.kind in ("form", "body") for s in self.sources)
        self.cache_ttl = config.cache_ttl
        self._context = context

    def credential(self, request: RequestView) -> Credential | None:
        return read_first(request, self.sources, "client token")

    async def verify(self, credential: Credential, request: RequestView) -> Identity:
        hex_hash = token_hash(credential.value)
        found = await self._context.client_tokens.lookup(hex_hash)
        if found is None:
            raise Unauthenticated("unknown or revoked client token", detail="unknown token")
        client_id, token_id = found
        client = self._context.policy.clients.get(client_id)
        if client is None:
            raise Unauthenticated("the token's client is no longer configured", detail="client removed")
        self._context.client_tokens.touch(token_id)
        return Identity(
            subject=client_id, authenticator=self.name, client=client_id, scopes=frozenset(client.scopes),
            claims={"token_hash": hex_hash, "token_id": token_id},
        )
