"""Per-route request rate limits (SPEC §14, README "Limits and overload"): `rate_limit: {per: client|ip, rps,
burst, fail}` — GCRA (the generic cell rate algorithm): each key keeps one number, the theoretical arrival
time (TAT); a request is allowed when TAT + one interval lies within `burst` intervals of now, and moves TAT on
by one interval. In Redis (one Lua script, Redis's own clock, so every replica agrees) when `redis:` is
configured, else in this process. Refused: 429 `rate_limited` with Retry-After. When Redis cannot be asked, the
route's `fail` decides: `open` lets the request through, `closed` answers 503 `dependency_unavailable`."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from sidecar.errors import DependencyUnavailable, RateLimited
from sidecar.state.store import PREFIX, failing_closed

if TYPE_CHECKING:
    from sidecar.authn.base import Identity
    from sidecar.config.limits import RateLimitConfig
    from sidecar.state.store import MemoryStore, RedisStore

# KEYS[1]: the key; ARGV: interval and tolerance in microseconds. Returns 0 (allowed) or the wait in µs.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - tonumber(ARGV[2])
if allow_at > now then return allow_at - now end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return 0
"""
_LOCAL_MAX = 100_000  # keys kept in process before the stale ones are swept


class RateLimiter:
    def __init__(self, store: MemoryStore | RedisStore) -> None:
        self.store = store
        redis = getattr(store, "redis", None)
        self._script = redis.register_script(_GCRA) if redis is not None and store.shared else None
        self._local: dict[str, float] = {}

    async def check(self, route_id: str, config: RateLimitConfig, identity: Identity | None, client_ip: str) -> None:
        """`RateLimited` when this request is over the route's rate for its client (or address). With no identity
        (a report-only route's refused credential) the address counts."""
        who = (identity.client or identity.subject) if config.per == "client" and identity is not None else client_ip
        key = f"{PREFIX}rate:{route_id}:{config.per}:{who}"
        interval = 1.0 / config.rps
        tolerance = interval * config.burst
        if self._script is None:
            wait = self._local_check(key, interval, tolerance)
        else:
            try:
                async with failing_closed():
                    waited = await self._script(keys=[key], args=[round(interval * 1e6), round(tolerance * 1e6)])
                wait = int(waited) / 1e6
            except DependencyUnavailable:
                if config.fail == "open":
                    return
                raise
        if wait > 0:
            raise RateLimited(max(1, math.ceil(wait)))

    def _local_check(self, key: str, interval: float, tolerance: float) -> float:
        now = time.monotonic()
        tat = max(self._local.get(key, now), now)
        new_tat = tat + interval
        allow_at = new_tat - tolerance
        if allow_at > now:
            return allow_at - now
        if len(self._local) >= _LOCAL_MAX:
            self._local = {k: v for k, v in self._local.items() if v > now}
        self._local[key] = new_tat
        return 0.0
