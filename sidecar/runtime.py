"""Everything a running sidecar holds for its lifetime: the compiled policy, the verdict cache, the
transports (one pool per upstream and timeouts), the JWKS key caches (one per URL), the control-plane HTTP
client, audit log and metrics. Built once at start; a reload swaps the policy, applies the new `cache:` and
`timeouts:` settings, and keeps the rest. What a reload cannot change (`RESTART_KEYS`) refuses the reload."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from sidecar.authn.jwks import JwksKeys
from sidecar.events import Events
from sidecar.issuer.signing_keys import IDENTITY_TOKEN_TYPE, SigningKeys
from sidecar.ops.audit import AuditLog
from sidecar.ops.metrics import Metrics
from sidecar.outbound.guard import ServiceClient
from sidecar.proxy.rate_limit import RateLimiter
from sidecar.proxy.route_plans import Policy
from sidecar.proxy.transports.base import Transport
from sidecar.proxy.transports.registry import make_transport
from sidecar.proxy.verdict_cache import StoreVerdicts, VerdictCache
from sidecar.proxy.websocket import Tunnels
from sidecar.state.attempt_limits import AttemptLimits
from sidecar.state.client_public_keys import PUBLIC_KEY_UPDATED, ClientKeys
from sidecar.state.client_token_store import ClientTokens
from sidecar.state.store import make_store
from sidecar.webhooks.worker import Webhooks

if TYPE_CHECKING:
    from sidecar.authn.base import Identity
    from sidecar.config.clients import ClientConfig
    from sidecar.config.model import Config, LoadedConfig, TimeoutsConfig, UpstreamTlsConfig

log = logging.getLogger("sidecar")

IDENTITY_TOKEN_LIFETIME = 30.0


class Reload(NamedTuple):
    applied: bool
    errors: list[str]
    restart: list[str] = []  # the keys whose change needs a restart (the reload was refused for them)


def _issuer_prefix(config: Config) -> str:
    from sidecar.issuer.endpoints import DEFAULT_PREFIX

    return (config.issuer.prefix if config.issuer else DEFAULT_PREFIX).rstrip("/")


# What is built once, at start, from these keys; a reload that changes one is refused as a whole (the running
# configuration stays in force) with a message naming the key: the operator restarts instead.
RESTART_KEYS: tuple[tuple[str, str, Callable[[Config], object]], ...] = (
    ("redis", "the Redis connection is made once, at start",
     lambda config: config.redis),
    ("issuer.signing_key", "the signing keys are loaded once, at start",
     lambda config: config.issuer.signing_keys() if config.issuer else []),
    ("issuer.prefix", "the issuer endpoints are mounted once, at start", _issuer_prefix),
    ("listen", "the listener is opened once, at start (its certificate files are reloaded when they change)",
     lambda config: config.listen),
)


def restart_required(old: Config, new: Config) -> list[str]:
    """The keys in `RESTART_KEYS` whose value differs between the running and the new configuration."""
    return [key for key, _, value in RESTART_KEYS if value(old) != value(new)]


class Services:
    def __init__(self, loaded: LoadedConfig, *, audit: AuditLog | None = None, metrics: Metrics | None = None) -> None:
        config = loaded.config
        self.loaded = loaded
        self.audit = audit or AuditLog()
        self.metrics = metrics or Metrics()
        self.http = ServiceClient()
        self.transports: dict[tuple[str, float, float, UpstreamTlsConfig | None], Transport] = {}
        self._jwks: dict[str, JwksKeys] = {}
        self._jwks_loaders: dict[str, asyncio.Task[None]] = {}
        issuer = config.issuer
        self.signing = SigningKeys(issuer.signing_keys() if issuer else [], issuer.issuer if issuer else "")
        self.store = make_store(config.redis)
        self.cache = VerdictCache(
            config.cache.ttl, config.cache.negative_ttl, config.cache.max_entries,
            shared=StoreVerdicts(self.store) if self.store.shared else None,
            on_result=self.metrics.cache_result, max_bytes=config.cache.max_bytes,
        )
        self.tunnels = Tunnels(config.websocket.max_tunnels, self.metrics.websocket_tunnels,
                               self.metrics.websocket_bytes)
        self.client_tokens = ClientTokens(self.store, config.clients, on_revoked=self._evict_token)
        self.client_keys = ClientKeys(self.store)
        self.rate_limits = RateLimiter(self.store)
        self.attempts = AttemptLimits(self.store, config.limits.attempts, self.audit, self.metrics)
        self.events = Events()
        self.webhooks = Webhooks(self)
        self.events.add_sink(self.webhooks.enqueue)
        self.policy = Policy(loaded, self)
        self.store.subscribe(self._on_store_message)
        self.store.on_reconnect(self._forget_revocable_verdicts)
        self.store.on_health(self.metrics.redis_health)
        self._background: list[asyncio.Task[None]] = []
        self._identity_tokens: dict[tuple[str, str | None, frozenset[str], str], tuple[str, float]] = {}

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
        self.tunnels.close_revoked(hex_hash)  # and the WebSocket tunnels opened with it, at once

    def _forget_revocable_verdicts(self) -> None:
        """Revocations may have been missed while the channel was down: drop every verdict they could affect."""
        revocable = {a.name for a in self.policy.authenticators.values() if a.revocable}
        self.cache.local.evict_where(lambda v: getattr(v, "authenticator", None) in revocable)

    @property
    def config(self) -> Config:
        return self.policy.config

    @property
    def clients(self) -> Mapping[str, ClientConfig]:
        return self.policy.clients

    def transport_for(self, upstream_url: str, timeouts: TimeoutsConfig | None = None,
                      tls: UpstreamTlsConfig | None = None) -> Transport:
        """The transport for this upstream with these timeouts and TLS settings (the policy being built passes its
        own: a reload that changes `timeouts:` or `upstream_tls:` gets new transports). One that a new policy no
        longer uses is left to finish what it carries and closed at shutdown; a later policy with the same settings
        takes it up again."""
        timeouts = timeouts or self.loaded.config.timeouts
        key = (upstream_url, timeouts.connect, timeouts.read, tls)
        transport = self.transports.get(key)
        if transport is None:
            transport = self.transports[key] = make_transport(upstream_url, timeouts.connect, timeouts.read, tls)
        return transport

    def jwks_for(self, url: str) -> JwksKeys:
        """The key cache for this JWKS URL, shared by every policy that names it: a reload keeps the keys."""
        keys = self._jwks.get(url)
        if keys is None:
            keys = self._jwks[url] = JwksKeys(url, self.http)
        return keys

    def jwks_not_loaded(self) -> list[str]:
        """The authenticators whose JWKS has no key yet (for readiness and metrics); their background loader
        keeps trying."""
        return sorted(name for name, auth in self.policy.authenticators.items()
                      if auth.key_set is not None and not auth.key_set.loaded)

    async def _load_jwks(self) -> None:
        """Fetch each JWKS the policy uses that has no key yet (once, awaited: usually the pod is ready at once);
        those still without keys get a background loader that retries until they load. Key caches no policy
        uses any more are dropped, with their loaders."""
        in_use = {auth.key_set.url: auth.key_set for auth in self.policy.authenticators.values()
                  if auth.key_set is not None}
        for url in [url for url in self._jwks if url not in in_use]:
            del self._jwks[url]
            loader = self._jwks_loaders.pop(url, None)
            if loader is not None:
                loader.cancel()
        for url, keys in in_use.items():
            loader = self._jwks_loaders.get(url)
            if keys.loaded or (loader is not None and not loader.done()):
                continue
            await keys.refresh()
            if not keys.loaded:
                self._jwks_loaders[url] = asyncio.ensure_future(keys.load_in_background())

    def issuer_public_keys(self) -> list[tuple[str, Any]]:
        return self.signing.public_keys

    def identity_token(self, identity: Identity) -> str | None:
        """With `identity.signed_token`, a short JWT the backend can verify against the JWKS (SPEC §4)."""
        if not self.policy.config.identity.signed_token or not self.signing:
            return None
        # Signing costs ~1 ms (RSA): one token per identity is reused for a third of its lifetime.
        key = (identity.subject, identity.client, identity.scopes, identity.authenticator)
        now = time.monotonic()
        cached = self._identity_tokens.get(key)
        if cached is not None and cached[1] > now:
            return cached[0]
        claims = {"sub": identity.subject, "client_id": identity.client, "scope": " ".join(sorted(identity.scopes)),
                  "auth_method": identity.authenticator}
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
        await self._load_jwks()

    async def _flush_metrics(self) -> None:
        self.metrics.cache_bytes.set(self.cache.local.bytes)
        self.metrics.cache_entries.set(len(self.cache.local))
        self.metrics.flush()
        self.tunnels.flush_metrics()

    async def _every(self, seconds: float, job: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            with contextlib.suppress(Exception):
                await job()

    async def aclose(self) -> None:
        for task in [*self._background, *self._jwks_loaders.values()]:
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

    async def reload_from_file(self, reason: str = "signal") -> Reload:
        """Validate the file fully, then swap the policy and apply the new `cache:` settings (`timeouts:` come
        with the policy's transports). A bad file, or one changing a key that needs a restart (`RESTART_KEYS`),
        is refused as a whole: the running configuration stays in force. Requests in flight keep the policy they
        started with."""
        from sidecar.config.loader import load
        from sidecar.config.yaml_lines import ConfigError

        path = self.loaded.path
        self._config_stamp = _file_stamp(path)  # this version is dealt with, applied or refused: no retry loop
        restart: list[str] = []
        try:
            loaded = load(path)
            restart = restart_required(self.loaded.config, loaded.config)
            if restart:
                why = {key: because for key, because, _ in RESTART_KEYS}
                raise ConfigError([f"{path}: {key}: changing {key} needs a restart ({why[key]}); the reload was "
                                   "refused and the running configuration stays in force" for key in restart])
            policy = Policy(loaded, self)
        except ConfigError as exc:
            extra = {"restart_required": restart} if restart else {}
            self.audit.write(kind="reload", decision="refused", reason=reason, errors=exc.errors, **extra)
            log.warning("reload refused: %s", "; ".join(exc.errors))
            return Reload(False, exc.errors, restart)
        except Exception as exc:  # a new policy that cannot even be built must not take the process down
            self.audit.write(kind="reload", decision="refused", reason=reason, errors=[repr(exc)])
            log.warning("reload refused: the new policy could not be built (%s)", type(exc).__name__)
            return Reload(False, [repr(exc)])
        config = loaded.config
        old = self.policy
        self.loaded = loaded
        self.policy = policy
        self.client_tokens.configure(config.clients)
        self.attempts.configure(config.limits.attempts)
        self.cache.configure(config.cache.ttl, config.cache.negative_ttl, config.cache.max_entries,
                             config.cache.max_bytes)
        self.tunnels.limit = config.websocket.max_tunnels
        self._forget_verdicts_of_changed(old, policy)
        self.signing.issuer = config.issuer.issuer if config.issuer else ""
        self._identity_tokens.clear()
        await self._load_jwks()
        self.audit.write(kind="reload", decision="applied", reason=reason, routes=len(config.routes))
        log.info("configuration reloaded", extra={"reason": reason, "routes": len(config.routes)})
        return Reload(True, [])

    def _forget_verdicts_of_changed(self, old: Policy, new: Policy) -> None:
        """Verdicts of an authenticator whose key fingerprint changed can no longer be found (verdict_cache.py);
        free their room now rather than when they expire."""
        changed = {name for name, auth in old.authenticators.items()
                   if name not in new.authenticators or new.authenticators[name].fingerprint != auth.fingerprint}
        if changed:
            self.cache.local.evict_where(lambda v: getattr(v, "authenticator", None) in changed)

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


def _file_stamp(path: str) -> tuple[str, int, int, int] | None:
    import os

    try:
        real = os.path.realpath(path)
        stat = os.stat(real)
    except OSError:
        return None
    return (real, stat.st_ino, stat.st_mtime_ns, stat.st_size)
