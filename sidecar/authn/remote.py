"""`remote`: the credential from `from:` (a header, query parameter, cookie or form field), vouched for by an
external webservice (seed 001: "valida_token", credential webservices, RFC 7662 introspection) — see
`sidecar.authn.remote_check` for the call and how answers are read.

Verdicts are cached by the gateway under a hash of this configuration and the credential (`cache_ttl`,
`negative_ttl`); concurrent misses for one credential make one call. An unreachable service or an answer that
is neither a clear yes nor a clear no is a 503, never an accept."""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import Field

from sidecar.authn.base import AuthenticatorBase, AuthnContext, Credential, Identity, fingerprint, read_first
from sidecar.authn.remote_check import CheckResult, RemoteCheck, check
from sidecar.config.types import CredentialSource, Source
from sidecar.errors import Unauthenticated
from sidecar.proxy.request_view import RequestView


class RemoteConfig(RemoteCheck):
    type: Literal["remote"]
    from_: list[CredentialSource] = Field(alias="from", min_length=1)


def pseudonymous_subject(credential: str) -> str:
    """The subject when the service names nobody (a `boolean` answer): stable per credential, and no more of it
    than the audit log may show (an 8-character hash prefix, SPEC §9)."""
    return "token:" + hashlib.sha256(credential.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def identity_from(result: CheckResult, authenticator: str, credential: str) -> Identity:
    return Identity(
        subject=result.subject or result.client or pseudonymous_subject(credential), authenticator=authenticator,
        client=result.client, scopes=result.scopes, claims=dict(result.claims), expires_at=result.expires_at,
    )


class RemoteAuthenticator(AuthenticatorBase):
    cacheable = True
    shared_cache = True  # one outside call per credential for every replica (sidecar.proxy.verdict_cache.StoreVerdicts)

    def __init__(self, name: str, config: RemoteConfig, context: AuthnContext) -> None:
        self.name = name
        self.config = config
        self.fingerprint = fingerprint(name, config)
        self.sources: tuple[Source, ...] = tuple(config.from_)
        self.needs_body = any(s.kind in ("form", "body") for s in self.sources)
        self.bearer = any(s.kind == "header" and s.name == "authorization" for s in self.sources)
        self.cache_ttl = config.cache_ttl
        self.negative_ttl = config.negative_ttl
        self._context = context

    def credential(self, request: RequestView) -> Credential | None:
        return read_first(request, self.sources, "credential")

    async def verify(self, credential: Credential, request: RequestView) -> Identity:
        result = await check(self._context.http, self.config, credential.value)
        if not result.accepted:
            raise Unauthenticated("the credential was refused by the validation service", detail=result.message)
        return identity_from(result, self.name, credential.value)
