"""Everything a running sidecar holds for its lifetime: the compiled policy, the verdict cache, the
transports (one pool per upstream), the control-plane HTTP client, audit log and metrics. Built once at
start; a reload swaps the policy and keeps the rest."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import httpx

from sidecar.audit import AuditLog
from sidecar.cache import VerdictCache
from sidecar.client_tokens import ClientTokens
from sidecar.events import Events
from sidecar.forward import Transport, make_transport
from sidecar.metrics import Metrics
from sidecar.policy import Policy
from sidecar.signing import SigningKeys
from sidecar.store import make_store
from sidecar.webhooks import Webhooks

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
        self.store = make_store(config.redis)
        self.client_tokens = ClientTokens(self.store, config.clients)
        self.events = Events()
        self.webhooks = Webhooks(self)
        self.events.add_sink(self.webhooks.enqueue)
        self.policy = Policy(loaded, self)
        self.store.subscribe(self._on_store_message)
        if hasattr(self.store, "on_reconnect"):
            self.store.on_reconnect(self._forget_revocable_verdicts)
        self._background: list[asyncio.Task[None]] = []
        self.ready = True

    def _on_store_message(self, message: dict[str, Any]) -> None:
        if message.get("type") == "token_revoked":
            hex_hash = message.get("token_hash")
            self.cache.local.evict_where(lambda v: getattr(v, "claims", {}).get("token_hash") == hex_hash)

    def _forget_revocable_verdicts(self) -> None:
        """Revocations may have been missed while the channel was down: drop every verdict they could affect."""
        revocable = {a.name for a in self.policy.authenticators.values() if getattr(a, "revocable", False)}
        self.cache.local.evict_where(lambda v: getattr(v, "method", None) in revocable)

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
        await self.store.start()
        await self.webhooks.start()
        self._background.append(asyncio.ensure_future(self._every(5.0, self.client_tokens.flush_last_used)))
        for auth in self.policy.authenticators.values():
            jwks = getattr(auth, "jwks", None)
            if jwks is not None:
                await jwks.refresh()

    async def _every(self, seconds: float, job: Any) -> None:
        while True:
            await asyncio.sleep(seconds)
            with contextlib.suppress(Exception):
                await job()

    async def aclose(self) -> None:
        for task in self._background:
            task.cancel()
        with contextlib.suppress(Exception):
            await self.client_tokens.flush_last_used()
        await self.webhooks.aclose()
        await self.store.aclose()
        self.audit.flush()
        for transport in self.transports.values():
            await transport.aclose()
        await self.http.aclose()
