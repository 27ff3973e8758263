"""An async JWKS cache: keys by `kid`, refreshed when a token names an unknown `kid`, at most once per
`min_interval` (a flood of made-up `kid`s must not become a flood of fetches to the IdP), and refreshed
in the background of a request when older than `max_age`. One fetch at a time.

While no key could be fetched at all (the IdP down when the sidecar starts), `load_in_background` keeps trying
on its own — 1 s, doubling to 30 s, with jitter — so the pod becomes ready without waiting for a request
(a pod that is not ready gets none). `loaded` and `last_error` say where it stands (readiness, metrics)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt

from sidecar.errors import DependencyUnavailable
from sidecar.ops import tracing

log = logging.getLogger("sidecar.jwks")

EMPTY_RETRY = 2.0  # seconds between fetches while no key could be fetched at all
BACKGROUND_FIRST = 1.0  # background retries while no key is loaded: 1 s, doubling up to BACKGROUND_MAX
BACKGROUND_MAX = 30.0


class JwksKeys:
    def __init__(
        self, url: str, http: httpx.AsyncClient, *, min_interval: float = 10.0, max_age: float = 300.0,
    ) -> None:
        self.url = url
        self._http = http
        self._min_interval = min_interval
        self._max_age = max_age
        self._keys: dict[str | None, list[jwt.PyJWK]] = {}
        self._fetched_at = 0.0
        self._attempted_at = -1e9
        self._inflight: asyncio.Future[None] | None = None
        self.last_error: str | None = None  # why the last fetch failed (an exception type), None after a success

    @property
    def loaded(self) -> bool:
        return bool(self._keys)

    async def keys_for(self, kid: str | None) -> list[Any]:
        """The keys that may have signed a token with this `kid` (all keys when the token names none)."""
        now = time.monotonic()
        if not self._keys or (kid is not None and kid not in self._keys) or now - self._fetched_at > self._max_age:
            # With no keys at all the IdP is retried sooner, but still rate-limited: a failing JWKS endpoint must
            # not be fetched once per request.
            interval = self._min_interval if self._keys else min(self._min_interval, EMPTY_RETRY)
            if now - self._attempted_at >= interval:
                await self.refresh()
        if not self._keys:
            raise DependencyUnavailable("the identity provider's keys could not be fetched")
        if kid is None:
            return [k for keys in self._keys.values() for k in keys]
        return list(self._keys.get(kid, ()))

    async def refresh(self, force: bool = False) -> None:
        """Fetch the key set, at most once per interval unless `force` (the background loader's own backoff)."""
        if self._inflight is not None:
            await asyncio.shield(self._inflight)
            return
        self._inflight = asyncio.get_running_loop().create_future()
        try:
            now = time.monotonic()
            interval = self._min_interval if self._keys else min(self._min_interval, EMPTY_RETRY)
            if not force and now - self._attempted_at < interval:
                return
            self._attempted_at = now
            await self._fetch()
        finally:
            self._inflight.set_result(None)
            self._inflight = None

    async def _fetch(self) -> None:
        try:
            with tracing.span("jwks.fetch", **{"server.address": urlsplit(self.url).hostname or ""}):
                response = await self._http.get(self.url, headers={"accept": "application/json"})
            response.raise_for_status()
            keyset = jwt.PyJWKSet.from_dict(response.json())
        except Exception as exc:  # any failure keeps the keys we had; none at all is a 503 above
            self.last_error = type(exc).__name__
            log.warning("jwks fetch from %s failed: %s", self.url, self.last_error)
            return
        self.last_error = None
        keys: dict[str | None, list[jwt.PyJWK]] = {}
        for key in keyset.keys:
            if key.public_key_use not in (None, "sig"):
                continue
            keys.setdefault(key.key_id, []).append(key)
        self._keys = keys
        self._fetched_at = time.monotonic()

    async def load_in_background(self, first: float = BACKGROUND_FIRST, longest: float = BACKGROUND_MAX) -> None:
        """Until some key is loaded: wait, fetch, and wait longer (doubling, bounded, jittered so that replicas
        restarted together do not retry in step). Requests may fetch meanwhile; they share the one fetch."""
        delay = first
        while not self.loaded:
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            if self.loaded:
                return
            await self.refresh(force=True)
            delay = min(longest, delay * 2)
