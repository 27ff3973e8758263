"""Attempt limits (SPEC §14, README "Limits and overload"): failed secret checks on the token endpoint, the key
endpoint (and its SOAP face) and the admin API are counted per source address and per client id; past a
threshold the address (or the client id) is locked out with exponential back-off, and the secret is not even
checked until the lock ends: `429 too_many_attempts` with `Retry-After`.

So that an attacker cannot lock a partner out cheaply:
- the per-address threshold (`per_address`, default 10) is far below the per-client one (`per_client`, 100): one
  address guessing a client's secret is stopped long before the client id is touched;
- the per-client count and lock concern only addresses that never authenticated as that client: an address
  that succeeded once (remembered `known_address_ttl`, 30 days) is never counted towards, nor refused by, the
  client's lock — a botnet can lock the id out for new addresses, never for the partner's own;
- only configured client ids are counted per client (unknown ids count per address only), so guessing ids
  creates no state per id.

Counters live in the store: Redis when configured (shared by every worker and replica), else this process.
When Redis cannot be used the limits fall back to this process's own count rather than failing closed: the
token endpoint keeps issuing tokens while Redis is down, and an attacker is still limited per process.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Literal

from sidecar.errors import DependencyUnavailable, TooManyAttempts
from sidecar.state.store import PREFIX, MemoryStore

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sidecar.config.limits import AttemptsConfig
    from sidecar.ip_addresses import Network
    from sidecar.ops.audit import AuditLog
    from sidecar.ops.metrics import Metrics
    from sidecar.state.store import RedisStore

log = logging.getLogger("sidecar")

Endpoint = Literal["token", "keys", "admin"]
# The token and key endpoints check the same client secrets: they share one count. The admin token is another.
_REALM: dict[str, str] = {"token": "client", "keys": "client", "admin": "admin"}
_LOCAL_SWEEP = 50_000  # entries in the local fallback store before expired ones are swept


class AttemptLimits:
    def __init__(self, store: MemoryStore | RedisStore, config: AttemptsConfig, audit: AuditLog,
                 metrics: Metrics) -> None:
        self.store = store
        self.local = store if isinstance(store, MemoryStore) else MemoryStore()
        self.config = config
        self.audit = audit
        self.metrics = metrics

    def configure(self, config: AttemptsConfig) -> None:
        self.config = config

    async def begin(self, endpoint: Endpoint, address: str, client: str | None = None) -> Attempt:
        """An attempt to check a secret from `address` (for the configured client id `client`, if any);
        `TooManyAttempts` when this address, or this client id from this unknown address, is locked out."""
        realm = _REALM[endpoint]
        keys = [f"{PREFIX}lockout:{realm}:addr:{address}"]
        if client is not None:
            keys += [f"{PREFIX}lockout:{realm}:client:{client}", _known_key(realm, client, address)]
        values = await self._mget(keys)
        known = client is not None and values[2] is not None
        now = time.time()
        until = _float(values[0])
        if client is not None and not known:
            until = max(until, _float(values[1]))
        if until > now:
            self.metrics.attempt(endpoint, "locked")
            raise TooManyAttempts(max(1, math.ceil(until - now)))
        return Attempt(self, endpoint, realm, address, client, known)

    async def _mget(self, keys: list[str]) -> list[str | None]:
        try:
            return await self.store.mget(keys)
        except DependencyUnavailable:
            return await self.local.mget(keys)

    async def _incr(self, key: str) -> int:
        try:
            return await self.store.incr(key, self.config.window)
        except DependencyUnavailable:
            self._sweep()
            return await self.local.incr(key, self.config.window)

    async def _set(self, key: str, value: str, ttl: float) -> None:
        try:
            await self.store.set(key, value, ttl)
        except DependencyUnavailable:
            self._sweep()
            await self.local.set(key, value, ttl)

    def _sweep(self) -> None:
        if len(self.local._data) > _LOCAL_SWEEP:
            for key in list(self.local._data):
                self.local._live(key)

    def lockout_seconds(self, failures: int, threshold: int) -> float:
        """`lockout` at the threshold, doubled for each failure past it, at most `max_lockout`."""
        exponent = min(failures - threshold, 40)
        return float(min(self.config.lockout * 2 ** exponent, self.config.max_lockout))


class Attempt:
    """One secret check under way: say how it went."""

    __slots__ = ("address", "client", "endpoint", "known", "limits", "realm")

    def __init__(self, limits: AttemptLimits, endpoint: Endpoint, realm: str, address: str, client: str | None,
                 known: bool) -> None:
        self.limits = limits
        self.endpoint = endpoint
        self.realm = realm
        self.address = address
        self.client = client
        self.known = known

    async def succeeded(self) -> None:
        limits = self.limits
        limits.metrics.attempt(self.endpoint, "ok")
        if self.client is not None and not self.known:
            await limits._set(_known_key(self.realm, self.client, self.address), "1", limits.config.known_address_ttl)

    async def failed(self, client: str | None = None) -> None:
        """The secret was wrong; `client`: the configured client id it was checked for (None: unknown id)."""
        limits, config = self.limits, self.limits.config
        limits.metrics.attempt(self.endpoint, "failed")
        failures = await limits._incr(f"{PREFIX}attempts:{self.realm}:addr:{self.address}")
        if failures >= config.per_address:
            await self._lock("address", f"{PREFIX}lockout:{self.realm}:addr:{self.address}", failures,
                             config.per_address)
        client = client if client is not None else self.client
        if client is None or self.known:
            return
        failures = await limits._incr(f"{PREFIX}attempts:{self.realm}:client:{client}")
        if failures >= config.per_client:
            await self._lock("client", f"{PREFIX}lockout:{self.realm}:client:{client}", failures, config.per_client,
                             client)

    async def _lock(self, scope: str, key: str, failures: int, threshold: int, client: str | None = None) -> None:
        limits = self.limits
        seconds = limits.lockout_seconds(failures, threshold)
        await limits._set(key, repr(time.time() + seconds), seconds)
        limits.metrics.lockout(self.endpoint, scope)
        limits.audit.write(kind="lockout", endpoint=self.endpoint, scope=scope, client=client, peer=self.address,
                           failures=failures, seconds=round(seconds, 3), decision="deny", reason="too_many_attempts")


def _known_key(realm: str, client: str, address: str) -> str:
    return f"{PREFIX}known:{realm}:{client}:{address}"


def _float(value: str | None) -> float:
    try:
        return float(value) if value is not None else 0.0
    except ValueError:
        return 0.0


def source_address(peer: str | None, headers: list[tuple[bytes, bytes]], trusted: Sequence[Network]) -> str:
    """The address attempts are counted for: the peer, or through `trusted_proxies` the X-Forwarded-For client."""
    from sidecar.proxy.request_view import client_address

    peer = peer or "unknown"
    if not trusted:
        return peer
    return client_address(peer, [value for name, value in headers if name == b"x-forwarded-for"], trusted)
