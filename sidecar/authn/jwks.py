"""An async JWKS cache: keys by `kid`, refreshed when a token names an unknown `kid`, at most once per
`min_interval` (a flood of made-up `kid`s must not become a flood of fetches to the IdP), and refreshed
in the background of a request when older than `max_age`. One fetch at a time."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
import jwt

from sidecar.errors import DependencyUnavailable

log = logging.getLogger("sidecar.jwks")

EMPTY_RETRY = 2.0  # seconds between fetches while no key could be fetched at all


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
        self.fetches = 0

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

    async def refresh(self) -> None:
        if self._inflight is not None:
            await asyncio.shield(self._inflight)
            return
        self._inflight = asyncio.get_running_loop().create_future()
        try:
            now = time.monotonic()
            interval = self._min_interval if self._keys else min(self._min_interval, EMPTY_RETRY)
            if now - self._attempted_at < interval:
                return
            self._attempted_at = now
            await self._fetch()
        finally:
            self._inflight.set_result(None)
            self._inflight = None

    async def _fetch(self) -> None:
        self.fetches += 1
        try:
            response = await self._http.get(self.url, headers={"accept": "application/json"})
            response.raise_for_status()
            keyset = jwt.PyJWKSet.from_dict(response.json())
        except Exception as exc:  # any failure keeps the keys we had; none at all is a 503 above
            log.warning("jwks fetch from %s failed: %s", self.url, type(exc).__name__)
            return
        keys: dict[str | None, list[jwt.PyJWK]] = {}
        for key in keyset.keys:
            if key.public_key_use not in (None, "sig"):
                continue
            keys.setdefault(key.key_id, []).append(key)
        self._keys = keys
        self._fetched_at = time.monotonic()
