"""Everything a running sidecar holds for its lifetime: the compiled policy, the verdict cache, the
transports (one pool per upstream), the control-plane HTTP client, audit log and metrics. Built once at
start; a reload swaps the policy and keeps the rest."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import httpx

from sidecar.audit import AuditLog
from sidecar.cache import StoreVerdicts, VerdictCache
from sidecar.client_keys import PUBLIC_KEY_UPDATED, ClientKeys
from sidecar.client_tokens import ClientTokens
from sidecar.events import Events
from sidecar.forward import Transport, make_transport
from sidecar.metrics import Metrics
from sidecar.policy import Policy
from sidecar.signing import IDENTITY_TOKEN_TYPE, SigningKeys
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
        self.store = make_store(config.redis)
        self.cache = VerdictCache(
            config.cache.ttl, config.cache.negative_ttl, config.cache.max_entries,
            shared=StoreVerdicts(self.store) if self.store.shared else None,
            on_result=self.metrics.cache_result,
        )
        self.client_tokens = ClientTokens(self.store, config.clients, on_revoked=self._evict_token)
        self.client_keys = ClientKeys(self.store)
        self.events = Events()
        self.webhooks = Webhooks(self)
        self.events.add_sink(self.webhooks.enqueue)
        self.policy = Policy(loaded, self)
        self.store.subscribe(self._on_store_message)
        if hasattr(self.store, "on_reconnect"):
            self.store.on_reconnect(self._forget_revocable_verdicts)
            self.store.on_health(self.metrics.redis_health)
        self._background: list[asyncio.Task[None]] = []
        self._identity_tokens: dict[tuple[Any, ...], tuple[str, float]] = {}
        self.ready = True

    def _on_store_message(self, message: dict[str, Any]) -> None:
        if message.get("type") == "token_revoked":
            self._evict_token(message.get("token_hash"))
        elif message.get("type") == PUBLIC_KEY_UPDATED:
            # The next request verifies with the new key: drop the old parsed key, the client's cached
            # identities, and cached refusals (one may be "no key registered" for this very client).
            client = str(message.get("client"))
            self.client_keys.forget(client)
            self.cache.local.evict_where(lambda v: getattr(v, "client", client) == client)

    def _evict_token(self, hex_hash: Any) -> None:
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
        # Signing costs ~1 ms (RSA): one token per identity is reused for a third of its lifetime.
        key = (identity.subject, identity.client, identity.scopes, identity.method)
        now = time.monotonic()
        cached = self._identity_tokens.get(key)
        if cached is not None and cached[1] > now:
            return cached[0]
        claims = {"sub": identity.subject, "client_id": identity.client, "scope": " ".join(sorted(identity.scopes)),
                  "auth_method": identity.method}
        token = self.signing.sign(claims, IDENTITY_TOKEN_LIFETIME, typ=IDENTITY_TOKEN_TYPE)
        if len(self._identity_tokens) > 10_000:
            self._identity_tokens.clear()
        self._identity_tokens[key] = (token, now + IDENTITY_TOKEN_LIFETIME / 3)
        return token

    async def start(self) -> None:
        await self.store.start()
        await self.webhooks.start()
        self._background.append(asyncio.ensure_future(self.watch_config()))
        self._background.append(asyncio.ensure_future(self._every(5.0, self.client_tokens.flush_last_used)))
        self._background.append(asyncio.ensure_future(self._every(1.0, self._flush_metrics)))
        self._background.append(asyncio.ensure_future(self._every(1.0, self.client_tokens.announce_pending)))
        for auth in self.policy.authenticators.values():
            jwks = getattr(auth, "jwks", None)
            if jwks is not None:
                await jwks.refresh()

    async def _flush_metrics(self) -> None:
        self.metrics.flush()

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
        self.metrics.flush()
        self.audit.flush()
        for transport in self.transports.values():
            await transport.aclose()
        await self.http.aclose()

    # --- reload (SIGHUP, POST /admin/reload, the file changing) -------------------------------------------------

    async def reload_from_file(self, reason: str = "signal") -> tuple[bool, list[str]]:
        """Validate the file fully, then swap the policy. A bad file is refused and the old policy stays; requests
        in flight keep the policy they started with. Redis, the cache and the listeners are not re-created:
        changing `redis:` needs a restart."""
        from sidecar.config import load
        from sidecar.yamlsource import ConfigError

        path = self.loaded.path
        try:
            loaded = load(path)
            policy = Policy(loaded, self)
        except ConfigError as exc:
            self.audit.write(kind="reload", decision="refused", reason=reason, errors=exc.errors)
            log.warning("reload refused: %s", "; ".join(exc.errors))
            return False, exc.errors
        except Exception as exc:  # a new policy that cannot even be built must not take the process down
            self.audit.write(kind="reload", decision="refused", reason=reason, errors=[repr(exc)])
            return False, [repr(exc)]
        for auth in policy.authenticators.values():
            jwks = getattr(auth, "jwks", None)
            if jwks is not None:
                await jwks.refresh()
        self.loaded = loaded
        self.policy = policy
        self.client_tokens.configure(loaded.config.clients)
        self._config_stamp = _file_stamp(path)
        self.audit.write(kind="reload", decision="applied", reason=reason, routes=len(loaded.config.routes))
        return True, []

    async def watch_config(self, interval: float = 1.0) -> None:
        """Reload when the file changes — including a Kubernetes ConfigMap update, which swaps a `..data`
        symlink (the path's target changes while the path itself is untouched)."""
        self._config_stamp = _file_stamp(self.loaded.path)
        while True:
            await asyncio.sleep(interval)
            stamp = _file_stamp(self.loaded.path)
            if stamp is not None and stamp != self._config_stamp:
                self._config_stamp = stamp
                await self.reload_from_file("file changed")


def _file_stamp(path: str) -> tuple[Any, ...] | None:
    import os

    try:
        real = os.path.realpath(path)
        stat = os.stat(real)
    except OSError:
        return None
    return (real, stat.st_ino, stat.st_mtime_ns, stat.st_size)
