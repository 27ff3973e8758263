"""The durable webhook queue, in Redis (SPEC §8, §10): shared by every worker and replica, surviving restarts.

- A Redis Stream holds deliveries ready to go. Queuing one is a single XADD of the whole delivery, and
  concurrent ones share a round trip (group commit: `add` returns once its entry is in Redis). One
  consumer group, shared by every process, hands each entry to one consumer (XREADGROUP); it stays in
  that consumer's pending list until acknowledged (XACK).
- A consumer that dies leaves its entries pending. While a delivery is in flight its consumer refreshes
  the claim (XCLAIM, every `LEASE / 5`); an entry idle for longer than `LEASE` belonged to a dead process
  and is taken over by a living one (XAUTOCLAIM) — so a slow receiver is never mistaken for a dead worker.
- Retries wait in a sorted set scored by due time; a Lua script moves due ones back to the stream, ZREM and
  XADD in one atomic step, so each is moved by exactly one process however many look at once.
- Each delivery's record is a hash, written by the first attempt and indexed by status in sorted sets, so
  any process answers the admin API (deliveries not yet attempted are read from the stream itself).
  Finished records expire (delivered after 7 days, failed after 30).
- At shutdown a process hands its unacknowledged entries back (re-added to the stream as they were, for
  any process to read) instead of leaving them to wait out the lease.

Every key carries the hash tag `{webhooks}`: the scripts touch several keys at once, which Redis Cluster
allows only within one slot.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from typing import Any

from redis.exceptions import ResponseError

from sidecar.webhooks.queue import STATUSES, Delivery, Ticket

log = logging.getLogger("sidecar.webhooks.worker")

PREFIX = "sidecar:{webhooks}:"
STREAM = PREFIX + "stream"
DUE = PREFIX + "due"
GROUP = "sidecar-webhooks"
LINGER = 0.005  # seconds new events wait to be written together with others
LEASE = 5.0  # seconds an entry may sit unrefreshed in a consumer's pending list before others take it
KEEP = {"delivered": 7 * 86400, "failed": 30 * 86400}
_JANITOR_EVERY = 60.0
_GONE_CONSUMER_IDLE_MS = 3600 * 1000

_ADD = """
for i = 1, #ARGV, 5 do
  redis.call('XADD', KEYS[1], '*', 'd', ARGV[i], 'e', ARGV[i + 1], 'w', ARGV[i + 2], 't', ARGV[i + 3],
             'b', ARGV[i + 4])
end
"""
_BEGIN = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status and #ARGV > 2 then
  redis.call('HSET', KEYS[1], 'id', ARGV[3], 'event', ARGV[4], 'webhook', ARGV[5], 'body', ARGV[6],
             'created', ARGV[7], 'status', 'pending', 'attempts', 0, 'last_error', '', 'next_attempt_at', '')
  redis.call('ZADD', KEYS[3], ARGV[8], ARGV[3])
  status = 'pending'
end
if status ~= 'pending' then
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[2], ARGV[2])
  return false
end
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'next_attempt_at', '')
return redis.call('HGETALL', KEYS[1])
"""
_SETTLE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'status', ARGV[4], 'last_error', ARGV[5], 'next_attempt_at', '')
  redis.call('EXPIRE', KEYS[1], ARGV[7])
  redis.call('ZREM', KEYS[3], ARGV[3])
  redis.call('ZADD', KEYS[4], ARGV[6], ARGV[3])
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[8])
end
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
"""
_SCHEDULE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'last_error', ARGV[5], 'next_attempt_at', ARGV[6])
  if ARGV[7] == '1' then redis.call('HINCRBY', KEYS[1], 'attempts', -1) end
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
end
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
"""
_PROMOTE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('XADD', KEYS[2], '*', 'd', id)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return nxt[2] or false
"""
_RELEASE = """
for i = 2, #ARGV do
  local entry = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])[1]
  if entry then redis.call('XADD', KEYS[1], '*', unpack(entry[2])) end
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
  redis.call('XDEL', KEYS[1], ARGV[i])
end
"""
_REQUEUE = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status ~= 'failed' then return status end
redis.call('HSET', KEYS[1], 'status', 'pending', 'attempts', 0, 'next_attempt_at', '')
redis.call('PERSIST', KEYS[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
redis.call('XADD', KEYS[2], '*', 'd', ARGV[1])
return 'ok'
"""


def record_key(delivery_id: str) -> str:
    return PREFIX + "d:" + delivery_id


def index_key(status: str) -> str:
    return PREFIX + "status:" + status


def entry_fields(delivery: Delivery) -> dict[str, str]:
    return {"d": delivery.id, "e": delivery.event, "w": delivery.webhook, "t": repr(delivery.created),
            "b": delivery.body}


def from_entry(fields: dict[str, str]) -> Delivery:
    return Delivery(id=fields["d"], event=fields["e"], webhook=fields["w"], body=fields["b"],
                    created=float(fields["t"]))


def _ms(epoch: float) -> int:
    return int(epoch * 1000)


class RedisQueue:
    durable = True

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self.consumer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._scripts = {name: redis.register_script(source) for name, source in (
            ("add", _ADD), ("begin", _BEGIN), ("settle", _SETTLE), ("schedule", _SCHEDULE), ("promote", _PROMOTE),
            ("release", _RELEASE), ("requeue", _REQUEUE))}
        self._batch: list[Delivery] = []
        self._waiting: list[asyncio.Future[None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._entries: dict[str, dict[str, str]] = {}  # entry id -> a new delivery read but not yet begun
        self._claim_at = 0.0
        self._claim_cursor = "0-0"
        self._janitor_at = time.monotonic() + _JANITOR_EVERY

    async def start(self) -> None:
        try:
            # From id 0, so entries queued before any consumer group existed are delivered too.
            await self.redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def add(self, deliveries: list[Delivery]) -> None:
        done = asyncio.get_running_loop().create_future()
        self._batch.extend(deliveries)
        self._waiting.append(done)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())
        await done

    async def _flush(self) -> None:
        """Write what accumulated over `LINGER` (and while the previous write was out) in one script call —
        group commit: an XADD costs several times less CPU batched than alone, and on a busy emit route the
        proxy's CPU is what queuing spends. The caller's reply has already been sent; only `add` waits."""
        while self._batch:
            await asyncio.sleep(LINGER)
            batch, waiting, self._batch, self._waiting = self._batch, self._waiting, [], []
            try:
                await self._scripts["add"](keys=[STREAM], args=[v for d in batch for v in entry_fields(d).values()])
            except Exception as exc:
                for done in waiting:
                    if not done.done():
                        done.set_exception(exc)
            else:
                for done in waiting:
                    if not done.done():
                        done.set_result(None)

    async def read(self, count: int, block: float) -> list[Ticket]:
        try:
            return await self._read(count, block)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.start()  # the stream was deleted under us: start again
            return []

    async def _read(self, count: int, block: float) -> list[Ticket]:
        now = time.monotonic()
        if now >= self._claim_at:
            self._claim_at = now + LEASE / 2
            claimed = await self._take_over(count)
            if claimed:
                return claimed
        if now >= self._janitor_at:
            self._janitor_at = now + _JANITOR_EVERY
            await self._forget_gone_consumers()
        reply = await self.redis.xreadgroup(GROUP, self.consumer, {STREAM: ">"}, count=count,
                                            block=max(1, int(block * 1000)))
        return await self._tickets([entry for _, entries in reply or [] for entry in entries])

    async def _take_over(self, count: int) -> list[Ticket]:
        """Entries a dead consumer left pending for longer than the lease."""
        cursor, entries, *_ = await self.redis.xautoclaim(STREAM, GROUP, self.consumer, min_idle_time=_ms(LEASE),
                                                          start_id=self._claim_cursor, count=count)
        self._claim_cursor = cursor
        if entries:
            log.warning("took over %d webhook deliveries left by a stopped process", len(entries))
        return await self._tickets(entries)

    async def _tickets(self, entries: list[Any]) -> list[Ticket]:
        tickets = []
        for entry_id, fields in entries:
            if fields and "d" in fields:
                tickets.append(Ticket(entry_id, fields["d"]))
                if "b" in fields:
                    self._entries[entry_id] = fields
            else:  # not ours to understand: drop it rather than trip over it forever
                await self.redis.xack(STREAM, GROUP, entry_id)
                await self.redis.xdel(STREAM, entry_id)
        return tickets

    async def _forget_gone_consumers(self) -> None:
        for consumer in await self.redis.xinfo_consumers(STREAM, GROUP):
            if consumer["pending"] == 0 and consumer["idle"] > _GONE_CONSUMER_IDLE_MS:
                await self.redis.xgroup_delconsumer(STREAM, GROUP, consumer["name"])

    async def begin(self, ticket: Ticket) -> Delivery | None:
        """Count an attempt; the first one writes the record from the stream entry."""
        fields = self._entries.pop(ticket.entry, None)
        new = [*(fields[k] for k in "dewbt"), _ms(float(fields["t"]))] if fields else []
        reply = await self._scripts["begin"](keys=[record_key(ticket.delivery), STREAM, index_key("pending")],
                                             args=[GROUP, ticket.entry, *new])
        if not reply:
            return None
        return Delivery.from_fields(dict(zip(reply[::2], reply[1::2], strict=True)))

    async def settle(self, ticket: Ticket, delivery: Delivery, status: str, error: str) -> None:
        keep = KEEP[status]
        await self._scripts["settle"](
            keys=[record_key(delivery.id), STREAM, index_key("pending"), index_key(status)],
            args=[GROUP, ticket.entry, delivery.id, status, error, _ms(delivery.created), keep,
                  _ms(time.time() - keep)])

    async def schedule(self, ticket: Ticket, delivery: Delivery, due: float, error: str,
                       uncount: bool = False) -> None:
        """Later, at `due`; `uncount`: the attempt `begin` counted was not made (deferred)."""
        await self._scripts["schedule"](keys=[record_key(delivery.id), STREAM, DUE],
                                        args=[GROUP, ticket.entry, delivery.id, _ms(due), error, repr(due),
                                              "1" if uncount else "0"])

    async def promote(self) -> float | None:
        next_due = await self._scripts["promote"](keys=[DUE, STREAM], args=[_ms(time.time()), 500])
        return float(next_due) / 1000 if next_due else None

    async def heartbeat(self, tickets: list[Ticket]) -> None:
        if tickets:
            await self.redis.xclaim(STREAM, GROUP, self.consumer, min_idle_time=0,
                                    message_ids=[t.entry for t in tickets], justid=True)

    async def release(self, tickets: list[Ticket]) -> None:
        """Everything still pending for this consumer — the tickets in hand and any read but never seen —
        goes back to the stream, as it was, for another process to take."""
        pending = await self.redis.xpending_range(STREAM, GROUP, min="-", max="+", count=10_000,
                                                  consumername=self.consumer)
        entries = [p["message_id"] for p in pending]
        if entries:
            await self._scripts["release"](keys=[STREAM], args=[GROUP, *entries])
        await self.redis.xgroup_delconsumer(STREAM, GROUP, self.consumer)
        self._entries.clear()

    async def listing(self, status: str | None, limit: int) -> list[Delivery]:
        found: dict[str, Delivery] = {}
        for each in [status] if status else STATUSES:
            ids = await self.redis.zrevrange(index_key(each), 0, limit - 1)
            pipe = self.redis.pipeline(transaction=False)
            for delivery_id in ids:
                pipe.hgetall(record_key(delivery_id))
            for delivery_id, fields in zip(ids, await pipe.execute() if ids else [], strict=True):
                if fields:
                    found[delivery_id] = Delivery.from_fields(fields)
                else:  # the record expired: its index entry goes too
                    await self.redis.zrem(index_key(each), delivery_id)
        if status in (None, "pending"):  # queued but not attempted yet: only the stream knows them
            for _, fields in await self.redis.xrevrange(STREAM, "+", "-", count=limit):
                if "b" in fields and fields["d"] not in found:
                    found[fields["d"]] = from_entry(fields)
        return sorted(found.values(), key=lambda d: d.created, reverse=True)[:limit]

    async def get(self, delivery_id: str) -> Delivery | None:
        fields = await self.redis.hgetall(record_key(delivery_id))
        return Delivery.from_fields(fields) if fields else None

    async def requeue(self, delivery_id: str) -> str:
        delivery = await self.get(delivery_id)
        if delivery is None:
            return "missing"
        return str(await self._scripts["requeue"](
            keys=[record_key(delivery_id), STREAM, index_key("failed"), index_key("pending")],
            args=[delivery_id, _ms(delivery.created)]))
