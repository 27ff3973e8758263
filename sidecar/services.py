"""Everything a running sidecar holds for its lifetime: the compiled policy, the verdict cache, the
transports (one pool per upstream), the control-plane HTTP client, audit log and metrics. Built once at
start; a reload swaps the policy and keeps the rest."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import httpx

from sidecar.audit import AuditLog
from sidecar.cache import VerdictCache
from sidecar.forward import Transport, make_transport
from sidecar.metrics import Metrics
from sidecar.policy import Policy
from sidecar.signing import SigningKeys

if TYPE_CHECKING:
    from sidecar.authn.base import Identity
    from sidecar.config import LoadedConfig

log = logging.getLogger("sidecar")

IDENTITY_TOKEN_LIFETIME = 30.0


class Services:
    def __init__(self, loaded: LoadedConfig, *, audit: AuditLog | None = None, metrics: Metrics | None = None) -> None:
        config = loaded.config
        self.loaded = loaded
        self.audit = audit or AuditLog()
        self.metrics = metrics or Metrics()
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(5.0), follow_redirects=False, trust_env=False)
        self.transports: dict[str, Transport] = {}
        issuer = config.issuer
        self.signing = SigningKeys(issuer.signing_keys() if issuer else [], issuer.issuer if issuer else "")
        self.cache = VerdictCache(
            config.cache.ttl, config.cache.negative_ttl, config.cache.max_entries,
            on_result=self.metrics.cache_result,
        )
        self.policy = Policy(loaded, self)
        self.ready = True

    @property
    def config(self) -> Any:
        return self.policy.config

    def transport_for(self, upstream_url: str) -> Transport:
        transport = self.transports.get(upstream_url)
        if transport is None:
            timeouts = self.loaded.config.timeouts
            transport = self.transports[upstream_url] = make_transport(upstream_url, timeouts.connect, timeouts.read)
        return transport

    def issuer_public_keys(self) -> list[tuple[str, Any]]:
        return self.signing.public_keys

    def identity_token(self, identity: Identity) -> str | None:
        """With `identity.signed_token`, a short JWT the backend can verify against the JWKS (SPEC §4)."""
        if not self.policy.config.identity.signed_token or not self.signing:
            return None
        claims = {"sub": identity.subject, "client_id": identity.client, "scope": " ".join(sorted(identity.scopes)),
                  "auth_method": identity.method}
        return self.signing.sign(claims, IDENTITY_TOKEN_LIFETIME)

    async def start(self) -> None:
        for auth in self.policy.authenticators.values():
            jwks = getattr(auth, "jwks", None)
            if jwks is not None:
                await jwks.refresh()

    async def aclose(self) -> None:
        self.audit.flush()
        for transport in self.transports.values():
            await transport.aclose()
        await self.http.aclose()
