"""Shared state (SPEC §10): minted client tokens, revocations, one-time marks (single-use keys, JWT ids),
registered public keys and the identifier map. In Redis when `redis:` is configured — shared by every
worker and replica, surviving restarts — else in this process's memory (one process only, lost at exit).

Keys carry a `{hash tag}` so that the keys one operation touches live in one Redis Cluster slot; `atomically`
changes several of them in one step (a Lua script). Every Redis failure becomes `DependencyUnavailable` (503):
the sidecar fails closed. What is true about Redis (reachable, listening for revocations, the cluster's state,
since when) is kept in `RedisHealth` for `/readyz` and the metrics."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from sidecar.errors import DependencyUnavailable
from sidecar.state.redis_target import connect, describe_failure, parse_redis_url

log = logging.getLogger("sidecar")

PREFIX = "sidecar:"
REVOCATIONS = PREFIX + "revocations"
HEALTH_EVERY = 2.0  # seconds between background probes of Redis

# Writes `atomically` may group; all their keys must share one hash slot (Redis refuses CROSSSLOT otherwise).
ATOMIC_COMMANDS = frozenset({"SET", "DEL", "HSET", "HDEL", "SADD", "SREM"})
_ATOMIC = """
local ops = cjson.decode(ARGV[1])
for _, op in ipairs(ops) do
  local args = {op[1], KEYS[op[2]]}
  for i = 3, #op do args[#args + 1] = op[i] end
  redis.call(unpack(args))
end
return #ops
"""
# A counter that is forgotten `ttl` after its last increment (the attempt limits' failure counts).
_INCR = """
local n = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return n
"""


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
    health = None

    def __init__(self) -> None:
        self._data: dict[str, tuple[str, float | None]] = {}
        self._sets: dict[str, set[str]] = {}
        self._hashes: dict[str, dict[str, str]] = {}
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

    async def incr(self, key: str, ttl: float) -> int:
        """Add one to a counter and forget it `ttl` seconds from now."""
        count = int(self._live(key) or 0) + 1
        self._data[key] = (str(count), time.time() + ttl)
        return count

    async def delete(self, *keys: str) -> None:
        for key in keys:
            self._data.pop(key, None)
            self._sets.pop(key, None)
            self._hashes.pop(key, None)

    async def sadd(self, key: str, member: str) -> None:
        self._sets.setdefault(key, set()).add(member)

    async def srem(self, key: str, member: str) -> None:
        self._sets.get(key, set()).discard(member)

    async def hget(self, key: str, field: str) -> str | None:
        return self._hashes.get(key, {}).get(field)

    async def hgetall(self, key: str) -> dict[str, str]:
        return dict(self._hashes.get(key, {}))

    async def hset(self, key: str, field: str, value: str) -> None:
        self._hashes.setdefault(key, {})[field] = value

    async def atomically(self, ops: list[tuple[str, ...]]) -> None:
        for name, key, *args in _checked(ops):  # no await in between: nothing else runs meanwhile
            if name == "SET":
                self._data[key] = (args[0], None)
            elif name == "DEL":
                await self.delete(key)
            elif name == "HSET":
                self._hashes.setdefault(key, {})[args[0]] = args[1]
            elif name == "HDEL":
                self._hashes.get(key, {}).pop(args[0], None)
            elif name == "SADD":
                self._sets.setdefault(key, set()).add(args[0])
            else:
                self._sets.get(key, set()).discard(args[0])

    async def smembers(self, key: str) -> builtins.set[str]:
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

    def on_health(self, callback: Callable[[RedisHealth], None]) -> None:
        """There is no Redis to report on: the callback is never due."""

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


def _checked(ops: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    for op in ops:
        if op[0] not in ATOMIC_COMMANDS:
            raise ValueError(f"{op[0]} is not a command `atomically` runs")
    return ops


class RedisHealth:
    """What is true about Redis, as this process sees it: /readyz's body and the `sidecar_redis_*` gauges.
    `since` is when the last of reachable / listening / cluster state changed."""

    def __init__(self, mode: str, tls: bool) -> None:
        self.mode = mode
        self.tls = tls
        self.reachable: bool | None = None  # None until the first probe
        self.listening = False  # subscribed to the revocation channel
        self.cluster_state: str | None = None  # cluster mode: "ok" when every master answers and says ok
        self.nodes = 0
        self.nodes_ok = 0
        self.error: str | None = None
        self.since = time.time()

    @property
    def healthy(self) -> bool:
        return bool(self.reachable) and self.listening and self.cluster_state in (None, "ok")

    def _state(self) -> tuple[Any, ...]:
        return self.reachable, self.listening, self.cluster_state

    def update(self, **changes: Any) -> bool:
        """Apply changes; True when the state changed (and `since` moved)."""
        before = self._state()
        for name, value in changes.items():
            setattr(self, name, value)
        if self._state() != before:
            self.since = time.time()
            return True
        return False

    def as_dict(self) -> dict[str, Any]:
        report: dict[str, Any] = {
            "mode": self.mode, "tls": self.tls, "reachable": bool(self.reachable),
            "revocations_channel": "listening" if self.listening else "down",
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since)),
        }
        if self.mode == "cluster":
            report.update(cluster_state=self.cluster_state or "unknown", masters=self.nodes, masters_ok=self.nodes_ok)
        if self.error and not self.healthy:
            report["error"] = self.error
        return report


class RedisStore:
    """The store in Redis, with a pub/sub listener that tells this process about revocations and a probe that
    keeps `health` true. Both recover by themselves: a cluster client (re)loads its slot map before they use
    it, and the listener tries another node when one fails (classic pub/sub reaches every cluster node)."""

    shared = True

    def __init__(self, url: str) -> None:
        self.target = parse_redis_url(url)
        self.redis = connect(self.target)
        self.cluster = self.target.mode == "cluster"
        self.health = RedisHealth(self.target.mode, self.target.tls)
        self._subscribers: list[Callable[[dict[str, Any]], Awaitable[None] | None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._on_reconnect: list[Callable[[], None]] = []
        self._on_health: list[Callable[[RedisHealth], None]] = []
        self._starting = True
        self._troubled = False
        self._atomic = self.redis.register_script(_ATOMIC)
        self._incr = self.redis.register_script(_INCR)

    @property
    def connected(self) -> bool:
        """False while the revocation channel is not listened to: a revocation could be missed, so what depends
        on it must fail closed (and what was cached is dropped when it comes back)."""
        return self.health.listening

    async def ping(self) -> bool:
        await self.check_health()
        return bool(self.health.reachable)

    async def get(self, key: str) -> str | None:
        async with failing_closed():
            return await self.redis.get(key)

    async def mget(self, keys: list[str]) -> list[str | None]:
        async with failing_closed():
            if self.cluster:  # keys in several slots: one GET each, concurrently
                return list(await asyncio.gather(*(self.redis.get(key) for key in keys)))
            return list(await self.redis.mget(keys))

    async def set(self, key: str, value: str, ttl: float | None = None, only_new: bool = False) -> bool:
        async with failing_closed():
            px = max(1, int(ttl * 1000)) if ttl else None
            return bool(await self.redis.set(key, value, px=px, nx=only_new))

    async def incr(self, key: str, ttl: float) -> int:
        """Add one to a counter and forget it `ttl` seconds from now (one step: a Lua script)."""
        async with failing_closed():
            return int(await self._incr(keys=[key], args=[max(1, int(ttl * 1000))]))

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

    async def smembers(self, key: str) -> builtins.set[str]:
        async with failing_closed():
            return set(await self.redis.smembers(key))

    async def hget(self, key: str, field: str) -> str | None:
        async with failing_closed():
            return await self.redis.hget(key, field)

    async def hgetall(self, key: str) -> dict[str, str]:
        async with failing_closed():
            return dict(await self.redis.hgetall(key))

    async def hset(self, key: str, field: str, value: str) -> None:
        async with failing_closed():
            await self.redis.hset(key, field, value)

    async def atomically(self, ops: list[tuple[str, ...]]) -> None:
        """Several writes as one step (a Lua script runs whole or not at all). Their keys share one hash slot."""
        keys: list[str] = []
        encoded = []
        for name, key, *args in _checked(ops):
            if key not in keys:
                keys.append(key)
            encoded.append([name, keys.index(key) + 1, *args])
        async with failing_closed():
            await self._atomic(keys=keys, args=[json.dumps(encoded)])

    async def publish(self, channel: str, message: dict[str, Any]) -> None:
        data = json.dumps(message)
        async with failing_closed():
            if not self.cluster:
                await self.redis.publish(channel, data)
                return
            # Any node will do (classic pub/sub is broadcast over the cluster bus, also while the cluster is
            # down): try them in turn, so a dead master does not silence the announcement.
            await self.redis.initialize()
            nodes = list(self.redis.get_primaries())
            random.shuffle(nodes)
            failure: BaseException | None = None
            for node in nodes:
                try:
                    await asyncio.wait_for(self.redis.publish(channel, data, target_nodes=node), 2.0)
                    return
                except Exception as exc:
                    failure = exc
            raise failure or ConnectionError("no cluster node is known")

    def subscribe(self, callback: Callable[[dict[str, Any]], Awaitable[None] | None]) -> None:
        self._subscribers.append(callback)

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        self._on_reconnect.append(callback)

    def on_health(self, callback: Callable[[RedisHealth], None]) -> None:
        self._on_health.append(callback)
        callback(self.health)

    async def start(self) -> None:
        """Load the cluster's slot map and subscribe before serving (a client token is checked within the first
        second), then keep both up in the background. A Redis that is down now is not fatal: it is reported."""
        await self.check_health()
        self._tasks = [asyncio.ensure_future(self._listen()), asyncio.ensure_future(self._monitor())]
        for _ in range(100):  # wait up to 1 s for the first subscription
            if self.connected:
                break
            await asyncio.sleep(0.01)
        self._starting = False
        if not self.health.healthy:
            self._log_state()

    # --- health ---------------------------------------------------------------------------------------------

    async def check_health(self) -> RedisHealth:
        """Probe Redis now (the background monitor does, every `HEALTH_EVERY` seconds)."""
        try:
            if self.cluster:
                changes = await self._probe_cluster()
            else:
                await asyncio.wait_for(self.redis.ping(), 2.0)
                changes = {"reachable": True, "error": None}
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            changes = {"reachable": False, "error": await self._diagnose(exc)}
            if self.cluster:
                changes.update(cluster_state="unknown", nodes_ok=0)
        self._report(**changes)
        return self.health

    async def _diagnose(self, exc: BaseException) -> str:
        """Why Redis cannot be used. redis-py's "no master found" hides why the sentinels could not be asked:
        ask them ourselves."""
        from redis.asyncio.sentinel import MasterNotFoundError

        if not isinstance(exc, MasterNotFoundError):
            return describe_failure(exc)
        service = self.target.service
        for sentinel in self.redis.connection_pool.sentinel_manager.sentinels:
            try:
                await asyncio.wait_for(sentinel.ping(), 2.0)
            except Exception as failure:
                return f"no sentinel answers for {service!r}: {describe_failure(failure)}"
        return f"the sentinels know no healthy master named {service!r}"

    async def _probe_cluster(self) -> dict[str, Any]:
        await asyncio.wait_for(self.redis.initialize(), 3.0)  # loads the slot map if it is not loaded
        masters = list(self.redis.get_primaries())

        async def state(node: Any) -> str | BaseException:
            try:
                info = await asyncio.wait_for(self.redis.execute_command("CLUSTER INFO", target_nodes=node), 1.5)
            except Exception as exc:
                return exc
            return str(info.get("cluster_state", "unknown")) if isinstance(info, dict) else "unknown"

        states = await asyncio.gather(*(state(node) for node in masters))
        ok = sum(1 for s in states if s == "ok")
        failures = [s for s in states if isinstance(s, BaseException)]
        error = None
        if failures:
            error = f"{len(failures)} of {len(masters)} masters cannot be reached: {describe_failure(failures[0])}"
        elif ok < len(masters):
            error = "the nodes report cluster_state:fail (a hash slot has no reachable master)"
        return {"reachable": bool(masters) and not failures, "cluster_state": "ok" if masters and ok == len(masters)
                else "fail", "nodes": len(masters), "nodes_ok": ok, "error": error}

    def _report(self, **changes: Any) -> None:
        if not self.health.update(**changes):
            return
        for callback in self._on_health:
            callback(self.health)
        if not self._starting:
            self._log_state()

    def _log_state(self) -> None:
        """One line when Redis goes wrong (and how), one when it is right again; none for a clean start."""
        health = self.health
        if health.healthy:
            if self._troubled:
                log.warning("redis (%s) is back: reachable, listening for revocations", health.mode)
            self._troubled = False
            return
        self._troubled = True
        log.warning("redis (%s) trouble: reachable=%s, revocations channel %s%s%s", health.mode,
                    bool(health.reachable), "listening" if health.listening else "down",
                    f", cluster_state={health.cluster_state}" if self.cluster else "",
                    f": {health.error}" if health.error else "")

    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_EVERY)
            with contextlib.suppress(Exception):
                await self.check_health()

    # --- the revocation channel -----------------------------------------------------------------------------

    async def _subscribed(self, attempt: int) -> Any:
        if self.cluster:
            await asyncio.wait_for(self.redis.initialize(), 3.0)
            nodes = list(self.redis.get_primaries()) or list(self.redis.get_nodes())
            pubsub = self.redis.pubsub(node=nodes[attempt % len(nodes)])
        else:
            pubsub = self.redis.pubsub()
        try:
            await asyncio.wait_for(pubsub.subscribe(REVOCATIONS), 3.0)
        except BaseException:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            raise
        return pubsub

    async def _listen(self) -> None:
        attempt = 0
        pause = 0.1
        while True:
            pubsub = None
            try:
                pubsub = await self._subscribed(attempt)
                for callback in self._on_reconnect:
                    callback()  # anything published while we were away is unknown: drop what it could affect
                self._report(listening=True)
                pause = 0.1
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        await self._deliver(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.health.listening:
                    for callback in self._on_reconnect:
                        callback()
                self._report(listening=False, error=await self._diagnose(exc))
                attempt += 1  # the next try goes to another cluster node
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()

    async def _deliver(self, message: dict[str, Any]) -> None:
        try:
            payload = json.loads(message["data"])
        except (TypeError, ValueError):
            return
        for subscriber in list(self._subscribers):
            result = subscriber(payload)
            if result is not None:
                await result

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        with contextlib.suppress(Exception):
            await self.redis.aclose()


def make_store(url: str | None) -> MemoryStore | RedisStore:
    return RedisStore(url) if url else MemoryStore()
