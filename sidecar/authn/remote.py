"""`remote`: the credential from `from:` (a header, query parameter, cookie or form field), vouched for by an
external webservice (seed 001: "valida_token", credential webservices, RFC 7662 introspection) — see
`sidecar.authn.remote_check` for the call and how answers are read.

Verdicts are cached by the gateway under a hash of this configuration and the credential (`cache_ttl`,
`negative_ttl`); concurrent misses for one credential make one call. An unreachable service or an answer that
is neither a clear yes nor a clear no is a 503, never an accept."""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import Field

from sidecar.authn.base import Identity, fingerprint, read_first
from sidecar.authn.remote_check import CheckResult, RemoteCheck, check
from sidecar.config.types import CredentialSource, Source
from sidecar.errors import Unauthenticated
from sidecar.proxy.request_view import RequestView

MAX_CREDENTIAL_LENGTH = 4096


class RemoteConfig(RemoteCheck):
    type: Literal["remote"]
    from_: list[CredentialSource] = Field(alias="from", min_length=1)


def pseudonymous_subject(credential: str) -> str:
    """The subject when the service names nobody (a `boolean` answer): stable per credential, and no more of it
    than the audit log may show (an 8-character hash prefix, SPEC §9)."""
    return "token:" + hashlib.sha256(credential.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def identity_from(result: CheckResult, method: str, credential: str) -> Identity:
    return Identity(
        subject=result.subject or result.client or pseudonymous_subject(credential), method=method,
        client=result.client, scopes=result.scopes, claims=dict(result.claims), expires_at=result.expires_at,
    )


class RemoteAuthenticator:
    cacheable = True
    shared_cache = True  # one outside call per credential for every replica (sidecar.proxy.verdict_cache.StoreVerdicts)

    def __init__(self, name: str, config: RemoteConfig, services: Any) -> None:
        self.name = name
        self.config = config
        self.fingerprint = fingerprint(name, config)
        self.sources: tuple[Source, ...] = tuple(config.from_)
        self.needs_body = any(s.kind in ("form", "body") for s in self.sources)
        self.bearer = any(s.kind == "header" and s.name == "authorization" for s in self.sources)
        self.cache_ttl = config.cache_ttl
        self.negative_ttl = config.negative_ttl
        self._services = services

    def credential(self, request: RequestView) -> str | None:
        return read_first(request, self.sources)

    async def verify(self, credential: str, request: RequestView) -> Identity:
        if not credential:
            raise Unauthenticated("the credential is empty", detail="empty")
        if len(credential) > MAX_CREDENTIAL_LENGTH:
            raise Unauthenticated("the credential is too large", detail="oversized")
        result = await check(self._services.http, self.config, credential)
        if not result.accepted:
            raise Unauthenticated("the credential was refused by the validation service", detail=result.message)
        return identity_from(result, self.name, credential)
