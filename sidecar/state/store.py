"""Shared state (SPEC §10): minted client tokens, revocations, one-time marks (single-use keys, JWT ids),
registered public keys and the identifier map. In Redis when `redis:` is configured — shared by every
worker and replica, surviving restarts — else in this process's memory (one process only, lost at exit).

Keys carry a `{hash tag}` so that the keys one operation touches live in one Redis Cluster slot.
Every Redis failure becomes `DependencyUnavailable` (503): the sidecar fails closed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import unquote, urlsplit

from sidecar.errors import DependencyUnavailable

PREFIX = "sidecar:"
REVOCATIONS = PREFIX + "revocations"


def connect(url: str) -> Any:
    """A `redis.asyncio` client for `redis://`, `rediss://`, `unix://`, `redis+sentinel://host:26379[,host:port]/
    service[/db]` and `redis+cluster://host:6379`."""
    import redis.asyncio as redis

    options: dict[str, Any] = {"socket_connect_timeout": 1.0, "socket_timeout": 2.0, "health_check_interval": 15,
                               "decode_responses": True}
    parts = urlsplit(url)
    if parts.scheme == "redis+sentinel":
        from redis.asyncio.sentinel import Sentinel

        hosts = []
        for hostport in parts.netloc.rsplit("@", 1)[-1].split(","):
            host, _, port = hostport.partition(":")
            hosts.append((host, int(port or 26379)))
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ValueError("a redis+sentinel URL names the service: redis+sentinel://host:26379/mymaster/0")
        password = unquote(parts.password) if parts.password else None
        sentinel = Sentinel(hosts, socket_connect_timeout=1.0, socket_timeout=2.0)
        return sentinel.master_for(path[0], db=int(path[1]) if len(path) > 1 else 0, password=password,
                                   decode_responses=True, socket_connect_timeout=1.0, socket_timeout=2.0)
    if parts.scheme == "redis+cluster":
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url("redis://" + url.split("://", 1)[1], decode_responses=True,
                                     socket_connect_timeout=1.0, socket_timeout=2.0)
    return redis.Redis.from_url(url, **options)


@contextlib.asynccontextmanager
async def failing_closed() -> AsyncIterator[None]:
    """Redis errors (connection, timeout, cluster moves gone wrong) as a 503."""
    from redis.exceptions import RedisError

    try:
        yield
    except (TimeoutError, RedisError, OSError) as exc:
        raise DependencyUnavailable("the shared store (Redis) is unavailable") from exc


class MemoryStore:
    """The store of a sidecar without Redis: this process only."""

    shared = False

    def __init__(self) -> None:
        self._data: dict[str, tuple[str, float | None]] = {}
        self._sets: dict[str, set[str]] = {}
        self._subscribers: list[Callable[[dict[str, Any]], Awaitable[None] | None]] = []
        self.connected = True

    async def ping(self) -> bool:
        return True

    def _live(self, key: str) -> str | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[1] is not None and entry[1] <= time.time():
            del self._data[key]
            return None
        return entry[0]

    async def get(self, key: str) -> str | None:
        return self._live(key)

    async def mget(self, keys: list[str]) -> list[str | None]:
        return [self._live(k) for k in keys]

    async def set(self, key: str, value: str, ttl: float | None = None, only_new: bool = False) -> bool:
        if only_new and self._live(key) is not None:
            return False
        self._data[key] = (value, time.time() + ttl if ttl else None)
        return True

    async def delete(self, *keys: str) -> None:
        for key in keys:
            self._data.pop(key, None)

    async def sadd(self, key: str, member: str) -> None:
        self._sets.setdefault(key, set()).add(member)

    async def srem(self, key: str, member: str) -> None:
        self._sets.get(key, set()).discard(member)

    async def smembers(self, key: str) -> set[str]:
        return set(self._sets.get(key, set()))

    async def publish(self, channel: str, message: dict[str, Any]) -> None:
        for subscriber in list(self._subscribers):
            result = subscriber(message)
            if result is not None:
                await result

    def subscribe(self, callback: Callable[[dict[str, Any]], Awaitable[None] | None]) -> None:
        self._subscribers.append(callback)

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        """This process's own store never loses its channel, so the callback is never due."""

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class RedisStore:
    """The store in Redis, with a pub/sub listener that tells this process about revocations."""

    shared = True

    def __init__(self, url: str) -> None:
        self.url = url
        self.redis = connect(url)
        self._subscribers: list[Callable[[dict[str, Any]], Awaitable[None] | None]] = []
        self._listener: asyncio.Task[None] | None = None
        # False while the revocation channel is not listened to: a revocation could be missed, so what
        # depends on it must fail closed (and what was cached is dropped when it comes back).
        self.connected = False
        self._on_reconnect: list[Callable[[], None]] = []

    async def ping(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.redis.ping(), 2.0))
        except Exception:
            return False

    async def get(self, key: str) -> str | None:
        async with failing_closed():
            return await self.redis.get(key)

    async def mget(self, keys: list[str]) -> list[str | None]:
        async with failing_closed():
            return list(await self.redis.mget(keys))

    async def set(self, key: str, value: str, ttl: float | None = None, only_new: bool = False) -> bool:
        async with failing_closed():
            px = max(1, int(ttl * 1000)) if ttl else None
            return bool(await self.redis.set(key, value, px=px, nx=only_new))

    async def delete(self, *keys: str) -> None:
        async with failing_closed():
            for key in keys:  # one at a time: the keys may live in different cluster slots
                await self.redis.delete(key)

    async def sadd(self, key: str, member: str) -> None:
        async with failing_closed():
            await self.redis.sadd(key, member)

    async def srem(self, key: str, member: str) -> None:
        async with failing_closed():
            await self.redis.srem(key, member)

    async def smembers(self, key: str) -> set[str]:
        async with failing_closed():
            return set(await self.redis.smembers(key))

    async def publish(self, channel: str, message: dict[str, Any]) -> None:
        async with failing_closed():
            await self.redis.publish(channel, json.dumps(message))

    def subscribe(self, callback: Callable[[dict[str, Any]], Awaitable[None] | None]) -> None:
        self._subscribers.append(callback)

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        self._on_reconnect.append(callback)

    async def start(self) -> None:
        self._listener = asyncio.ensure_future(self._listen())
        for _ in range(100):  # wait up to 1 s for the first subscription
            if self.connected:
                break
            await asyncio.sleep(0.01)

    async def _listen(self) -> None:
        while True:
            pubsub = None
            try:
                pubsub = self.redis.pubsub()
                await pubsub.subscribe(REVOCATIONS)
                for callback in self._on_reconnect:
                    callback()  # anything published while we were away is unknown: drop what it could affect
                self.connected = True
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is None:
                        continue
                    try:
                        payload = json.loads(message["data"])
                    except (TypeError, ValueError):
                        continue
                    for subscriber in list(self._subscribers):
                        result = subscriber(payload)
                        if result is not None:
                            await result
            except asyncio.CancelledError:
                raise
            except Exception:
                self.connected = False
                for callback in self._on_reconnect:
                    callback()
                await asyncio.sleep(0.5)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(BaseException):
                await self._listener
        with contextlib.suppress(Exception):
            await self.redis.aclose()


def make_store(url: str | None) -> MemoryStore | RedisStore:
    return RedisStore(url) if url else MemoryStore()
